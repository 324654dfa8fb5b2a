#!/usr/bin/env python3
"""Validates Kubernetes objects the way an API server with strict field validation would, as
far as schemas go. Run by tests/tests/deploy.rs with the venv of requirements.txt.

  validate.py objects [--crd FILE]... [--k8s-version V]... FILE...
      Every document of every FILE ('-': stdin), by kind:
      - built-in kinds: kubernetes-validate, strict (unknown fields are errors), for each version;
      - monitoring.coreos.com/v1 PodMonitor: the prometheus-operator models (cloudcoil), plus
        unknown fields;
      - kinds of the CRDs given with --crd: the CRD's openAPIV3Schema (jsonschema), unknown
        fields being errors as with `kubectl apply` (server-side strict field validation);
      - anything else: an error (nothing passes unvalidated).
  validate.py istio-compat --crd FILE... [--as-istio FILE]...
      Compares the CRDs' spec fields with Istio's security.istio.io/v1 and networking.istio.io/v1
      models, and validates the custom resources of the --as-istio files as Istio objects
      (apiVersion changed).
Prints one line per document ('ok ...' or 'ERROR ...'); exits 1 when anything failed.
"""
import argparse
import copy
import sys
import types
import typing

import jsonschema
import kubernetes_validate
import yaml
from kubernetes_validate import utils as kv

errors = 0


def report(ok, where, message):
    global errors
    if not ok:
        errors += 1
    print(("ok    " if ok else "ERROR ") + where + (": " + message if message else ""))


def load(path):
    text = sys.stdin.read() if path == "-" else open(path).read()
    try:
        return [d for d in yaml.safe_load_all(text) if d]
    except yaml.YAMLError as e:
        report(False, path, "not YAML: %s" % str(e).replace("\n", " "))
        return []


def name_of(doc):
    meta = doc.get("metadata") or {}
    ns = meta.get("namespace")
    return "%s %s/%s" % (doc.get("apiVersion"), doc.get("kind"), (ns + "/" if ns else "") + str(meta.get("name")))


def strict_schema(schema):
    """The CRD schema as the API server applies it with strict field validation: an object with
    `properties` admits no other field (unknown fields are errors instead of being pruned)."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if not isinstance(node, dict):
            return
        if "properties" in node and "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
        for key in ("properties",):
            for sub in node.get(key, {}).values():
                walk(sub)
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                walk(node[key])

    walk(schema)
    # ObjectMeta as the API server requires it of a create: a name (or generateName).
    schema["properties"]["metadata"] = {
        "type": "object",
        "anyOf": [{"required": ["name"]}, {"required": ["generateName"]}],
        "properties": {"name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", "maxLength": 253}},
    }
    schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata"})
    return schema


def crd_validators(paths):
    out = {}
    for path in paths:
        for crd in load(path):
            if crd.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                schema = strict_schema(version["schema"]["openAPIV3Schema"])
                jsonschema.Draft202012Validator.check_schema(schema)
                out[("%s/%s" % (group, version["name"]), kind)] = jsonschema.Draft202012Validator(schema)
    return out


# --- unknown fields against pydantic models (the cloudcoil models ignore extra fields) ---------

def _alts(tp):
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _alts(typing.get_args(tp)[0])
    if origin in (typing.Union, types.UnionType):
        out = []
        for arg in typing.get_args(tp):
            if arg is not type(None):
                out.extend(_alts(arg))
        return out
    return [tp]


def unknown_fields(tp, value, path):
    """Paths of fields of `value` that the model type `tp` does not declare."""
    from pydantic import BaseModel, RootModel

    best = None
    for alt in _alts(tp):
        origin = typing.get_origin(alt)
        found = []
        if origin in (list, typing.List) and isinstance(value, list):
            (item,) = typing.get_args(alt) or (typing.Any,)
            for i, v in enumerate(value):
                found += unknown_fields(item, v, "%s[%d]" % (path, i))
        elif origin in (dict, typing.Dict) and isinstance(value, dict):
            args = typing.get_args(alt)
            for k, v in value.items():
                found += unknown_fields(args[1] if args else typing.Any, v, "%s[%s]" % (path, k))
        elif isinstance(alt, type) and issubclass(alt, RootModel):
            found = unknown_fields(alt.model_fields["root"].annotation, value, path)
        elif isinstance(alt, type) and issubclass(alt, BaseModel):
            if not isinstance(value, dict):
                continue
            fields = {(f.alias or n): f for n, f in alt.model_fields.items()}
            for k, v in value.items():
                if k not in fields:
                    found.append("%s.%s" % (path, k))
                else:
                    found += unknown_fields(fields[k].annotation, v, "%s.%s" % (path, k))
        if best is None or len(found) < len(best):
            best = found
        if not found:
            break
    return best or []


def check_model(model, doc, where):
    from pydantic import ValidationError

    try:
        model.model_validate(doc)
    except ValidationError as e:
        first = e.errors()[0]
        report(False, where, "%s: %s" % (".".join(str(p) for p in first["loc"]), first["msg"]))
        return False
    extra = unknown_fields(model, doc, "")
    if extra:
        report(False, where, "unknown field(s) %s" % ", ".join(p.lstrip(".") for p in extra))
        return False
    return True


def podmonitor_model():
    from cloudcoil.models.prometheus_operator import v1

    return v1.PodMonitor


# --- commands -----------------------------------------------------------------------------------

def cmd_objects(args):
    crds = crd_validators(args.crd)
    versions = args.k8s_version or [kv.latest_version()]
    for path in args.files:
        for doc in load(path):
            where = "%s %s" % (path, name_of(doc))
            key = (doc.get("apiVersion"), doc.get("kind"))
            if key in crds:
                errs = sorted(crds[key].iter_errors(doc), key=lambda e: list(e.absolute_path))
                if errs:
                    e = errs[0]
                    report(False, where, "%s: %s" % (".".join(str(p) for p in e.absolute_path) or "(root)", e.message))
                else:
                    report(True, where, "against its CRD schema")
                continue
            if key == ("monitoring.coreos.com/v1", "PodMonitor"):
                if check_model(podmonitor_model(), doc, where):
                    report(True, where, "prometheus-operator PodMonitor model")
                continue
            failed = False
            for version in versions:
                try:
                    kv.validate(doc, version, strict=True)
                except kv.ValidationError as e:
                    report(False, where, "Kubernetes %s: %s: %s" % (version, ".".join(str(p) for p in e.path) or "(root)", e.message))
                    failed = True
                    break
                except kv.SchemaNotFoundError as e:
                    report(False, where, "no schema to validate it with (%s)" % e.message)
                    failed = True
                    break
            if not failed:
                report(True, where, "Kubernetes %s, strict" % ", ".join(versions))


def schema_tree(node):
    """{field: subtree} of an openAPIV3Schema node; lists and maps are looked through."""
    if node.get("type") == "array":
        return schema_tree(node["items"])
    if "properties" in node:
        return {k: schema_tree(v) for k, v in node["properties"].items()}
    if isinstance(node.get("additionalProperties"), dict):
        sub = schema_tree(node["additionalProperties"])
        return {"*": sub} if sub is not None else None
    return None


def model_tree(tp, depth=0):
    from pydantic import BaseModel, RootModel

    if depth > 12:
        return None
    for alt in _alts(tp):
        origin = typing.get_origin(alt)
        if origin in (list, typing.List):
            return model_tree(typing.get_args(alt)[0], depth + 1)
        if origin in (dict, typing.Dict):
            args = typing.get_args(alt)
            sub = model_tree(args[1], depth + 1) if args else None
            return {"*": sub} if sub is not None else None
        if isinstance(alt, type) and issubclass(alt, RootModel):
            return model_tree(alt.model_fields["root"].annotation, depth + 1)
        if isinstance(alt, type) and issubclass(alt, BaseModel):
            return {(f.alias or n): model_tree(f.annotation, depth + 1) for n, f in alt.model_fields.items()}
    return None


def enums(node, path, out):
    if "enum" in node:
        out[path] = node["enum"]
    for k, v in node.get("properties", {}).items():
        enums(v, path + "." + k, out)
    for k in ("items", "additionalProperties"):
        if isinstance(node.get(k), dict):
            enums(node[k], path, out)
    return out


def model_enums(tp, path, out, depth=0):
    from pydantic import BaseModel, RootModel

    if depth > 12:
        return out
    for alt in _alts(tp):
        origin = typing.get_origin(alt)
        if origin is typing.Literal:
            out[path] = list(typing.get_args(alt))
        elif origin in (list, typing.List):
            model_enums(typing.get_args(alt)[0], path, out, depth + 1)
        elif origin in (dict, typing.Dict) and typing.get_args(alt):
            model_enums(typing.get_args(alt)[1], path, out, depth + 1)
        elif isinstance(alt, type) and issubclass(alt, RootModel):
            model_enums(alt.model_fields["root"].annotation, path, out, depth + 1)
        elif isinstance(alt, type) and issubclass(alt, BaseModel):
            for n, f in alt.model_fields.items():
                model_enums(f.annotation, path + "." + (f.alias or n), out, depth + 1)
    return out


# Differences from Istio 1.24's security.istio.io/v1 that are deliberate.
ONLY_OURS = {
    # Istio added these after 1.24 (the newest models installable here); Ambit enforces them.
    "AuthorizationPolicy": {"rules.from.source.serviceAccounts", "rules.from.source.notServiceAccounts"},
    "PeerAuthentication": set(),
    "RequestAuthentication": set(),
    # Istio added these after 1.24: Ambit's schema keeps them so they are rejected by name.
    "VirtualService": {"http.retries.backoff", "http.retries.retryIgnorePreviousHosts"},
    "DestinationRule": set(),
}
ONLY_ISTIO = {
    # Only for action CUSTOM, which our schema refuses (enum).
    "AuthorizationPolicy": {"provider"},
    "PeerAuthentication": set(),
    # `jwks_uri` is the models' alias of `jwksUri` (its protobuf name); pruned, the rule then
    # lacks `jwksUri` and is rejected naming it.
    "RequestAuthentication": {"jwtRules.jwks_uri"},
    # The parts a waypoint has no use for are objects whose content the schema leaves
    # undescribed (discovery/kube/crd/networking.rs): their fields are refused under strict
    # validation or pruned to an empty object, which Ambit rejects by name. A trailing `.*`
    # covers a whole subtree.
    # `mirror_percent` is the models' alias of `mirrorPercent` (its protobuf name).
    "VirtualService": {"tls.*", "tcp.*", "http.mirror_percent"},
    "DestinationRule": {
        "trafficPolicy.connectionPool.*", "trafficPolicy.outlierDetection.*", "trafficPolicy.tls.*",
        "trafficPolicy.portLevelSettings.*", "trafficPolicy.tunnel.*", "trafficPolicy.proxyProtocol.*",
        "trafficPolicy.loadBalancer.localityLbSetting.*",
        "subsets.trafficPolicy.connectionPool.*", "subsets.trafficPolicy.outlierDetection.*",
        "subsets.trafficPolicy.tls.*", "subsets.trafficPolicy.portLevelSettings.*",
        "subsets.trafficPolicy.tunnel.*", "subsets.trafficPolicy.proxyProtocol.*",
        "subsets.trafficPolicy.loadBalancer.localityLbSetting.*",
    },
}


def deliberate(path, allowed):
    return path in allowed or any(a.endswith(".*") and path.startswith(a[:-1]) for a in allowed)


def diff_trees(ours, theirs, path, only_ours, only_theirs):
    ours, theirs = ours or {}, theirs or {}
    for k in ours:
        p = (path + "." + k).lstrip(".")
        if k not in theirs:
            only_ours.append(p)
        else:
            diff_trees(ours[k], theirs[k], p, only_ours, only_theirs)
    for k in theirs:
        if k not in ours:
            only_theirs.append((path + "." + k).lstrip("."))


def istio_model(kind, part=None):
    if kind in ("VirtualService", "DestinationRule"):
        from cloudcoil.models.istio.networking import v1
    else:
        from cloudcoil.models.istio.security import v1

    cls = getattr(v1, kind)
    if part == "spec":
        return cls.model_fields["spec"].annotation
    return cls


# Ambit's own kinds: Istio has no resource to compare them with.
AMBIT_ONLY = {"RateLimitPolicy"}


def cmd_istio_compat(args):
    for path in args.crd:
        for crd in load(path):
            kind = crd["spec"]["names"]["kind"]
            if kind in AMBIT_ONLY:
                report(True, "%s %s" % (path, kind), "Ambit's own kind, no Istio equivalent")
                continue
            schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
            only_ours, only_istio = [], []
            diff_trees(schema_tree(schema), model_tree(istio_model(kind, "spec")), "", only_ours, only_istio)
            group = crd["spec"]["group"].replace("ambit.dev", "istio.io")
            where = "%s %s vs %s/v1 %s" % (path, kind, group, kind)
            bad_ours = sorted(p for p in set(only_ours) if not deliberate(p, ONLY_OURS[kind]))
            bad_istio = sorted(p for p in set(only_istio) if not deliberate(p, ONLY_ISTIO[kind]))
            if bad_ours:
                report(False, where, "fields Istio does not have: " + ", ".join(bad_ours))
            if bad_istio:
                report(False, where, "Istio fields missing from our schema (they would be pruned silently): " + ", ".join(bad_istio))
            ours_e, theirs_e = enums(schema, "spec", {}), model_enums(istio_model(kind, "spec"), "spec", {})
            for p, values in ours_e.items():
                extra = set(values) - set(theirs_e.get(p, values))
                if extra:
                    report(False, where, "%s: values Istio does not know: %s" % (p, sorted(extra)))
            if not bad_ours and not bad_istio:
                differences = sorted(set(only_ours) | set(only_istio))
                report(True, where, "same fields%s" % (
                    " (deliberate differences: %s)" % ", ".join(differences) if differences else ""))
    for path in args.as_istio:
        for doc in load(path):
            api_version = str(doc.get("apiVersion", ""))
            if not api_version.startswith(("security.ambit.dev/", "networking.ambit.dev/")):
                continue
            if doc.get("kind") in AMBIT_ONLY:
                continue
            istio_version = api_version.split("/")[0].replace("ambit.dev", "istio.io") + "/v1"
            istio = dict(doc, apiVersion=istio_version)
            where = "%s %s as %s" % (path, name_of(doc), istio_version)
            if check_model(istio_model(doc["kind"]), istio, where):
                report(True, where, "valid Istio object")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("objects")
    p.add_argument("--crd", action="append", default=[])
    p.add_argument("--k8s-version", action="append", default=[])
    p.add_argument("files", nargs="+")
    p = sub.add_parser("istio-compat")
    p.add_argument("--crd", action="append", default=[])
    p.add_argument("--as-istio", action="append", default=[])
    args = parser.parse_args()
    {"objects": cmd_objects, "istio-compat": cmd_istio_compat}[args.command](args)
    print("validate.py: %d error(s); kubernetes-validate %s" % (errors, kubernetes_validate.__version__ if hasattr(kubernetes_validate, "__version__") else "?"))
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
