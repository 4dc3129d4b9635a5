"""Reading and writing spec files (TOML, JSON, YAML), `--set a.b=c` overrides, and error messages.

Decoding is two steps: the file is parsed into plain data, overrides are applied to that data, then
`msgspec.convert` validates it into a `RunSpec`. Errors from either step are re-raised as `SpecError`
naming the file, the ``$.path``, the value found there and what is allowed.
"""

import difflib
import json
import re
from pathlib import Path
from typing import Any

import msgspec
import msgspec.inspect as mi
import yaml

from lowmem.spec.structs import RunSpec

FORMATS = {".toml": "toml", ".json": "json", ".yaml": "yaml", ".yml": "yaml"}
_MISSING = object()
# where a relative input path is looked for (see `rebase_inputs`), for "no such file" errors
RELATIVE_PATHS = "a relative path in a spec file is taken from its directory, one in --set from the working directory"


class SpecError(ValueError):
    """A spec that cannot be read: the message says where, what was found and how to fix it."""


# ------------------------------------------------------------------------------------------ decoding


def load_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunSpec:
    """Read a spec file (format from its suffix) and apply `key.path=value` overrides."""
    path = Path(path)
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise SpecError(f"{path}: unknown spec format {path.suffix!r}; use one of {', '.join(FORMATS)}")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SpecError(f"{path}: no such spec file (looked at {path.absolute()})") from None
    return decode_spec(data, fmt, source=str(path), overrides=overrides, base_dir=path.parent)


def decode_spec(
    data: bytes | str, fmt: str, *, source: str = "<spec>", overrides: list[str] | tuple[str, ...] = (),
    base_dir: str | Path | None = None,
) -> RunSpec:
    """Decode spec text in `fmt` ("toml", "json" or "yaml") into a validated RunSpec.

    `base_dir` (the spec file's directory): the relative input paths the text names are made relative to it
    (see `rebase_inputs`); paths given in `overrides` stay relative to the working directory.
    """
    raw = parse_raw(data, fmt, source)
    if base_dir is not None:
        rebase_inputs(raw, Path(base_dir))
    for override in overrides:
        apply_override(raw, override, source)
    return convert_spec(raw, source, overrides)


def rebase_inputs(raw: dict, base_dir: Path) -> None:
    """Join `base_dir` onto the relative input paths of a parsed spec, in place: data.source,
    data.tokenizer.path, and model.path when it names a directory there (else it is a hub id, `org/name`).

    `base_dir` is the spec file's directory as given, not resolved: the shipped examples/*.toml are links
    into the package, and a run should not read from (or be keyed on) the package's directory. Outputs
    (output.dir, data.cache_dir) stay relative to the working directory, as `lowmem init` sets up a
    directory to run in and the README's quickstart runs `examples/quickstart.toml` from the checkout.
    """
    if base_dir == Path("."):
        return
    data, model = raw.get("data"), raw.get("model")
    tokenizer = data.get("tokenizer") if isinstance(data, dict) else None
    for table, key in ((data, "source"), (tokenizer, "path"), (model, "path")):
        value = table.get(key) if isinstance(table, dict) else None
        if not isinstance(value, str) or value.startswith("builtin:") or Path(value).expanduser().is_absolute():
            continue
        if table is model and not (base_dir / value).is_dir():
            continue
        table[key] = str(base_dir / value)


def parse_raw(data: bytes | str, fmt: str, source: str) -> dict:
    """Parse spec text into plain data (no validation yet)."""
    try:
        if fmt == "toml":
            raw = msgspec.toml.decode(data)
        elif fmt == "json":
            raw = msgspec.json.decode(data)
        elif fmt == "yaml":
            raw = msgspec.yaml.decode(data)
        else:
            raise SpecError(f"{source}: unknown spec format {fmt!r}; use toml, json or yaml")
    except msgspec.DecodeError as err:
        raise SpecError(f"{source}: not valid {fmt.upper()}: {err}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: the top level must be a table/object, found {type(raw).__name__}")
    return raw


def convert_spec(raw: dict, source: str, overrides: list[str] | tuple[str, ...] = ()) -> RunSpec:
    """Validate plain data into a RunSpec, turning msgspec's errors into SpecErrors.

    An error at a value an override set names that `--set`, not the file.
    """
    try:
        return msgspec.convert(raw, RunSpec)
    except msgspec.ValidationError as err:
        raise SpecError(_explain(str(err), raw, _blamed(source, str(err), overrides))) from None


def _blamed(source: str, message: str, overrides: list[str] | tuple[str, ...]) -> str:
    """Where a validation error comes from: the last `--set` that wrote its path (or a table above it), else
    the spec file."""
    at = re.search(r" - at `\$\.?([^`]*)`$", message)
    path = at.group(1) if at else ""
    for override in reversed(overrides):
        key = override.partition("=")[0].strip()
        if key and (path == key or path.startswith(key + ".") or path.startswith(key + "[")):
            return f"--set {override}"
    return source


def encode_spec(spec: RunSpec, fmt: str = "toml") -> bytes:
    """Encode a spec; `decode_spec(encode_spec(s, f), f) == s` for every format."""
    if fmt == "toml":
        return msgspec.toml.encode(_drop_none(msgspec.to_builtins(spec)))
    if fmt == "json":
        return msgspec.json.format(msgspec.json.encode(spec), indent=2)
    if fmt == "yaml":
        return msgspec.yaml.encode(spec)
    raise ValueError(f"unknown spec format {fmt!r}; use toml, json or yaml")


def _drop_none(obj: Any) -> Any:
    # TOML has no null; an absent optional field decodes to its default, which is None for every
    # optional field of the spec.
    if isinstance(obj, dict):
        return {k: _drop_none(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list):
        return [_drop_none(v) for v in obj]
    return obj


# ------------------------------------------------------------------------------------------ overrides


def apply_override(raw: dict, override: str, source: str = "<spec>") -> None:
    """Apply one `a.b.c=value` override to plain spec data, in place.

    The value is converted by the type of the field it lands on: text for string fields, otherwise
    JSON (`3e-4`, `true`, `["wq", "wv"]`) or YAML flow syntax (`[wq, wv]`); `none`/`null` unsets an
    optional field.
    """
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise SpecError(f"--set {override!r}: expected KEY=VALUE, e.g. --set train.steps=100")
    parts = key.split(".")
    node, type_ = raw, mi.type_info(RunSpec)
    for depth, part in enumerate(parts):
        here = "$." + ".".join(parts[:depth]) if depth else "$"
        struct = _struct_of(type_, node)
        if struct is None:
            raise SpecError(f"--set {key}: `{here}` is a value, not a table; it has no field {part!r}")
        if depth == len(parts) - 1 and struct.tag_field == part:
            _switch_variant(node, type_, part, text.strip())  # e.g. method.kind=lora
            return
        field = next((f for f in struct.fields if f.name == part), None)
        if field is None:
            raise SpecError(f"--set {key}: {_unknown_field_hint(part, struct, here)}")
        if depth == len(parts) - 1:
            node[part] = _parse_value(text.strip(), field.type)
            return
        child = node.get(part, _MISSING)
        if child is _MISSING or not isinstance(child, dict):
            child = _default_as_raw(field)
            node[part] = child
        node, type_ = child, field.type


def _switch_variant(node: dict, union: mi.Type, tag_field: str, tag: str) -> None:
    """Choose another tagged-union variant, keeping only the fields the new variant also has."""
    variants = [t for t in getattr(union, "types", ()) if isinstance(t, mi.StructType)]
    target = next((t for t in variants if t.tag == tag), None)
    if target is not None and node.get(tag_field) != tag:
        keep = {f.name for f in target.fields}
        for key in [k for k in node if k != tag_field and k not in keep]:
            del node[key]
    node[tag_field] = tag  # an unknown tag is reported, with the allowed ones, by validation


def _default_as_raw(field: mi.Field) -> dict:
    """The table to create for an absent field: only the default's variant tag, so that the fields the user
    did not write keep their defaults even if a later override switches the variant. An optional tagged union
    left out (`data.tokenizer`) starts as its first variant."""
    default = field.default
    if default is None:
        variants = [t for t in getattr(field.type, "types", ()) if isinstance(t, mi.StructType) and t.tag]
        return {variants[0].tag_field: variants[0].tag} if variants else {}
    if default is mi.NODEFAULT or not isinstance(default, msgspec.Struct):
        return {}
    config = default.__struct_config__
    return {config.tag_field: config.tag} if config.tag_field else {}


def _parse_value(text: str, type_: mi.Type) -> Any:
    if text.lower() in ("none", "null") and _accepts(type_, mi.NoneType):
        return None
    if _accepts(type_, mi.StrType) or _literal_of_str(type_):
        return text
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _accepts(type_: mi.Type, kind: type) -> bool:
    if isinstance(type_, mi.UnionType):
        return any(isinstance(t, kind) for t in type_.types)
    return isinstance(type_, kind)


def _literal_of_str(type_: mi.Type) -> bool:
    types = type_.types if isinstance(type_, mi.UnionType) else (type_,)
    return any(isinstance(t, mi.LiteralType) and all(isinstance(v, str) for v in t.values) for t in types)


# ------------------------------------------------------------------------------------- error messages


def _struct_of(type_: mi.Type, raw_here: Any) -> mi.StructType | None:
    """The Struct type that describes `raw_here`, choosing a tagged-union variant by its tag."""
    if isinstance(type_, mi.StructType):
        return type_
    if isinstance(type_, mi.UnionType):
        structs = [t for t in type_.types if isinstance(t, mi.StructType)]
        if len(structs) == 1:
            return structs[0]
        if structs and isinstance(raw_here, dict):
            tag = raw_here.get(structs[0].tag_field)
            for s in structs:
                if s.tag == tag:
                    return s
    return None


def _walk(raw: Any, type_: mi.Type, parts: list[str | int]) -> tuple[Any, mi.Type | None]:
    """Follow a parsed ``$.path`` through the data and the type tree together."""
    node: Any = raw
    for part in parts:
        if isinstance(part, int):
            node = node[part] if isinstance(node, list) and part < len(node) else _MISSING
            type_ = getattr(type_, "item_type", None) if type_ is not None else None
            continue
        struct = _struct_of(type_, node) if type_ is not None else None
        field = next((f for f in struct.fields if f.name == part), None) if struct else None
        type_ = field.type if field else None
        node = node.get(part, _MISSING) if isinstance(node, dict) else _MISSING
    return node, type_


def _split_path(path: str) -> list[str | int]:
    parts: list[str | int] = []
    for name, index in re.findall(r"\.([^.\[]+)|\[(\d+)\]", path[1:]):
        parts.append(int(index) if index else name)
    return parts


def _describe_allowed(type_: mi.Type | None) -> str | None:
    if type_ is None:
        return None
    if isinstance(type_, mi.LiteralType):
        return "one of " + ", ".join(repr(v) for v in type_.values)
    if isinstance(type_, mi.UnionType):
        tags = [t.tag for t in type_.types if isinstance(t, mi.StructType) and t.tag]
        if tags:
            return "a table with kind = " + " | ".join(repr(t) for t in tags)
        parts = [_describe_allowed(t) for t in type_.types]
        return " or ".join(p for p in parts if p)
    names = {
        mi.IntType: "an integer",
        mi.FloatType: "a number",
        mi.StrType: "a string",
        mi.BoolType: "true or false",
        mi.NoneType: "nothing (leave it out)",
    }
    for kind, text in names.items():
        if isinstance(type_, kind):
            return text
    if isinstance(type_, mi.StructType):
        return "a table with fields " + ", ".join(f.name for f in type_.fields)
    return None


def _unknown_field_hint(name: str, struct: mi.StructType, where: str) -> str:
    allowed = [f.name for f in struct.fields]
    close = difflib.get_close_matches(name, allowed, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    kind = f" (kind = {struct.tag!r})" if struct.tag else ""
    if not allowed:
        return f"unknown field {name!r} at `{where}`{kind}, which has no fields; choose another kind first"
    return f"unknown field {name!r} at `{where}`{kind}; allowed: {', '.join(allowed)}{hint}"


def _explain(message: str, raw: dict, source: str) -> str:
    match = re.match(r"^(.*?)(?: - at `(\$[^`]*)`)?$", message, re.S)
    reason, path = match.group(1), match.group(2) or "$"
    root = mi.type_info(RunSpec)
    unknown = re.match(r"Object contains unknown field `([^`]+)`", reason)
    if unknown:
        node, type_ = _walk(raw, root, _split_path(path))
        struct = _struct_of(type_, node)
        if struct is not None:
            return f"{source}: {_unknown_field_hint(unknown.group(1), struct, path)}"
    missing = re.match(r"Object missing required field `([^`]+)`", reason)
    if missing:
        where = path if path != "$" else "$"
        return f"{source}: `{where}.{missing.group(1)}` is required but missing; add it to the spec"
    node, type_ = _walk(raw, root, _split_path(path))
    if isinstance(type_, mi.StructType) or path == "$":
        return f"{source}: invalid `{path}`: {reason}"  # a cross-field rule: its message says what to do
    found = "missing" if node is _MISSING else repr(node)
    lines = [f"{source}: invalid value at `{path}`: {found}: {reason}"]
    union = _walk(raw, root, _split_path(path)[:-1])[1] if path.endswith(".kind") else None
    tags = [t.tag for t in getattr(union, "types", ()) if isinstance(t, mi.StructType) and t.tag]
    allowed = "one of " + ", ".join(repr(t) for t in tags) if tags else _describe_allowed(type_)
    if allowed:
        lines.append(f"allowed: {allowed}{_did_you_mean(node, tags or _string_choices(type_))}")
    return "; ".join(lines)


def _string_choices(type_: mi.Type | None) -> list[str]:
    """The strings a Literal field (or a union holding Literals) accepts; [] for any other type."""
    types = type_.types if isinstance(type_, mi.UnionType) else (type_,)
    return [v for t in types if isinstance(t, mi.LiteralType) for v in t.values if isinstance(v, str)]


def _did_you_mean(found: Any, choices: list[str]) -> str:
    """'; did you mean 'lora'?' when the bad string `found` is close to one of `choices`, else ''."""
    close = difflib.get_close_matches(found.lower(), choices, n=1) if isinstance(found, str) else []
    return f"; did you mean {close[0]!r}?" if close else ""
