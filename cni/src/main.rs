//! The `ambit-cni` binary: the runtime's environment and stdin in, the result or the error
//! object out (exit status 1 on error), as the CNI specification says.
use std::io::{Read as _, Write as _};
use std::process::ExitCode;

use ambit_cni::plugin::{self, CniError, Invocation, UnixAgent};

fn main() -> ExitCode {
    let invocation = Invocation::from_env(|name| std::env::var(name).ok());
    let mut stdin = Vec::new();
    let read = std::io::stdin().read_to_end(&mut stdin);
    // The error object is in the configuration's version when it can be read.
    let version = serde_json::from_slice::<serde_json::Value>(&stdin)
        .ok()
        .and_then(|conf| conf["cniVersion"].as_str().map(str::to_string))
        .unwrap_or_else(|| "1.0.0".into());
    let outcome = match read {
        Ok(_) => plugin::run(&invocation, &stdin, &UnixAgent),
        Err(err) => Err(CniError {
            code: plugin::code::DECODING_FAILURE,
            msg: "cannot read the network configuration from stdin".into(),
            details: err.to_string(),
        }),
    };
    let mut stdout = std::io::stdout().lock();
    match outcome {
        Ok(Some(result)) => {
            let _ = writeln!(stdout, "{result}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(err) => {
            let _ = writeln!(stdout, "{}", err.to_json(&version));
            // Runtimes log stderr too: say it in one line for people.
            eprintln!("ambit-cni: {} ({})", err.msg, err.details);
            ExitCode::FAILURE
        }
    }
}
