//! Serde helpers shared by every parser of outside input (the mesh file, Kubernetes objects,
//! Ambit's policies, the CA's pod cache). Depends on nothing else of the crate.
use serde::{Deserialize, Deserializer};

/// `null` means the default, as in the Kubernetes API's Go structs and for a YAML key with no
/// value (`workloads:` whose entries are all commented out). Use with `#[serde(default,
/// deserialize_with = "null_as_default")]`: `default` covers the absent key.
pub fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize, PartialEq)]
    struct Holder {
        #[serde(default, deserialize_with = "null_as_default")]
        items: Vec<u32>,
    }

    #[test]
    fn null_and_absent_mean_the_default() {
        let parse = |json: &str| serde_json::from_str::<Holder>(json).unwrap().items;
        assert_eq!(parse(r#"{"items": null}"#), Vec::<u32>::new());
        assert_eq!(parse("{}"), Vec::<u32>::new());
        assert_eq!(parse(r#"{"items": [1, 2]}"#), [1, 2]);
        assert!(serde_json::from_str::<Holder>(r#"{"items": "x"}"#).is_err());
    }
}
