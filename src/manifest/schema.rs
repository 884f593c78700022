//! Stage 1 of validation: the JSON Schemas generated from the raw types, and checking a
//! document against them with every error mapped to a line and column.

use super::raw::{BudgetManifest, FleetManifest, JobManifest};
use super::yaml::{YamlDocument, escape_pointer_segment};
use super::{Kind, Problem};
use jsonschema::ValidationError;
use jsonschema::error::{TypeKind, ValidationErrorKind};
use schemars::JsonSchema;
use schemars::generate::SchemaSettings;
use serde_json::Value;
use std::path::Path;
use std::sync::OnceLock;

/// The JSON Schema of one kind, as a value.
pub(crate) fn schema_value(kind: Kind) -> &'static Value {
    static JOB: OnceLock<Value> = OnceLock::new();
    static FLEET: OnceLock<Value> = OnceLock::new();
    static BUDGET: OnceLock<Value> = OnceLock::new();
    match kind {
        Kind::Job => JOB.get_or_init(generate::<JobManifest>),
        Kind::Fleet => FLEET.get_or_init(generate::<FleetManifest>),
        Kind::Budget => BUDGET.get_or_init(generate::<BudgetManifest>),
    }
}

fn generate<T: JsonSchema>() -> Value {
    let schema = SchemaSettings::draft2020_12()
        .into_generator()
        .into_root_schema_for::<T>();
    let mut value = schema.to_value();
    drop_null(&mut value);
    value
}

/// An absent optional field is spelled by leaving it out; writing `null` is a mistake we
/// want reported as "expected a string, found nothing". schemars makes every `Option`
/// nullable, and the resulting `anyOf` would also hide the errors inside the field.
fn drop_null(value: &mut Value) {
    match value {
        Value::Object(map) => {
            if let Some(Value::Array(any_of)) = map.get("anyOf") {
                let is_null = |v: &Value| v.get("type").and_then(Value::as_str) == Some("null");
                if any_of.len() == 2
                    && any_of.iter().any(is_null)
                    && let Some(Value::Object(inner)) = any_of.iter().find(|v| !is_null(v))
                {
                    let inner = inner.clone();
                    map.remove("anyOf");
                    for (k, v) in inner {
                        map.entry(k).or_insert(v);
                    }
                }
            }
            if let Some(Value::Array(types)) = map.get_mut("type") {
                types.retain(|t| t != "null");
                if types.len() == 1 {
                    let only = types.remove(0);
                    map.insert("type".into(), only);
                }
            }
            if map.get("default") == Some(&Value::Null) {
                map.remove("default");
            }
            map.values_mut().for_each(drop_null);
        }
        Value::Array(items) => items.iter_mut().for_each(drop_null),
        _ => {}
    }
}

fn validator(kind: Kind) -> &'static jsonschema::Validator {
    static JOB: OnceLock<jsonschema::Validator> = OnceLock::new();
    static FLEET: OnceLock<jsonschema::Validator> = OnceLock::new();
    static BUDGET: OnceLock<jsonschema::Validator> = OnceLock::new();
    let cell = match kind {
        Kind::Job => &JOB,
        Kind::Fleet => &FLEET,
        Kind::Budget => &BUDGET,
    };
    cell.get_or_init(|| {
        // The schema is generated from our own types, so failing here is a bug in asimov,
        // not something a manifest can cause.
        jsonschema::validator_for(schema_value(kind)).expect("generated manifest schema compiles")
    })
}

/// Checks a document against its kind's schema; every error, in document order.
pub(crate) fn check(file: &Path, doc: &YamlDocument, kind: Kind) -> Vec<Problem> {
    let root = schema_value(kind);
    let mut problems = Vec::new();
    for error in validator(kind).iter_errors(&doc.value) {
        explain(file, doc, root, &error, &mut problems);
    }
    problems
}

/// The nodes stage 1 objects to, as JSON pointers: each unknown field, each missing
/// field's object, and every other offending value. Used to cut a malformed document
/// down to the part that can still be checked for meaning.
pub(crate) fn error_paths(kind: Kind, value: &Value) -> Vec<String> {
    let mut paths = Vec::new();
    for error in validator(kind).iter_errors(value) {
        let pointer = error.instance_path().as_str();
        match error.kind() {
            ValidationErrorKind::AdditionalProperties { unexpected } => {
                for field in unexpected {
                    paths.push(format!("{pointer}/{}", escape_pointer_segment(field)));
                }
            }
            _ => paths.push(pointer.to_string()),
        }
    }
    paths
}

fn explain(
    file: &Path,
    doc: &YamlDocument,
    root: &Value,
    error: &ValidationError<'_>,
    out: &mut Vec<Problem>,
) {
    let pointer = error.instance_path().as_str();
    let instance = error.instance();
    let at_value = |message: String| Problem::at(file, doc.value_pos(pointer), pointer, message);
    match error.kind() {
        ValidationErrorKind::AdditionalProperties { unexpected } => {
            let allowed = allowed_fields(root, pointer);
            for field in unexpected {
                let child = format!("{pointer}/{}", escape_pointer_segment(field));
                let message = if allowed.is_empty() {
                    format!("unknown field `{field}`")
                } else {
                    format!(
                        "unknown field `{field}`, expected one of {}",
                        quote_list(&allowed)
                    )
                };
                out.push(Problem::at(file, doc.key_pos(&child), &child, message));
            }
        }
        ValidationErrorKind::Required { property } => {
            let name = property
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| property.to_string());
            out.push(Problem::at(
                file,
                doc.key_pos(pointer),
                pointer,
                format!("missing field `{name}`"),
            ));
        }
        ValidationErrorKind::Type { kind } => {
            let expected = match kind {
                TypeKind::Single(t) => describe_type(t.as_str()).to_string(),
                TypeKind::Multiple(set) => {
                    let names: Vec<_> = set.iter().map(|t| describe_type(t.as_str())).collect();
                    names.join(" or ")
                }
            };
            out.push(at_value(format!(
                "expected {expected}, found {}",
                describe_value(instance)
            )));
        }
        ValidationErrorKind::Enum { options } => {
            let options: Vec<String> = match options.as_array() {
                Some(a) => a.iter().map(plain).collect(),
                None => vec![plain(options)],
            };
            let expected = if options.len() == 1 {
                format!("`{}`", options[0])
            } else {
                format!("one of {}", quote_list(&options))
            };
            out.push(at_value(format!(
                "expected {expected}, found {}",
                describe_value(instance)
            )));
        }
        ValidationErrorKind::Constant { expected_value } => {
            out.push(at_value(format!(
                "expected `{}`, found {}",
                plain(expected_value),
                describe_value(instance)
            )));
        }
        ValidationErrorKind::Minimum { limit } => {
            out.push(at_value(format!(
                "expected at least {limit}, found {}",
                describe_value(instance)
            )));
        }
        ValidationErrorKind::Maximum { limit } => {
            out.push(at_value(format!(
                "expected at most {limit}, found {}",
                describe_value(instance)
            )));
        }
        ValidationErrorKind::MinItems { limit } => {
            out.push(at_value(format!(
                "expected at least {limit} item{}, found {}",
                if *limit == 1 { "" } else { "s" },
                describe_value(instance)
            )));
        }
        ValidationErrorKind::MinLength { .. } => {
            out.push(at_value("expected a non-empty string".to_string()));
        }
        _ => {
            let text = error.to_string();
            let mut chars = text.chars();
            let message = match chars.next() {
                Some(c) => c.to_lowercase().chain(chars).collect(),
                None => text,
            };
            out.push(at_value(message));
        }
    }
}

fn describe_type(t: &str) -> &'static str {
    match t {
        "object" => "a mapping",
        "array" => "a list",
        "string" => "a string",
        "integer" => "a whole number",
        "number" => "a number",
        "boolean" => "true or false",
        "null" => "nothing",
        _ => "a value",
    }
}

/// How a found value reads in a message.
pub(crate) fn describe_value(v: &Value) -> String {
    match v {
        Value::Null => "nothing".to_string(),
        Value::Object(_) => "a mapping".to_string(),
        Value::Array(a) if a.is_empty() => "an empty list".to_string(),
        Value::Array(_) => "a list".to_string(),
        other => other.to_string(),
    }
}

fn plain(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn quote_list(items: &[String]) -> String {
    items
        .iter()
        .map(|s| format!("`{s}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The property names the schema allows for the object at `pointer`.
fn allowed_fields(root: &Value, pointer: &str) -> Vec<String> {
    let mut node = resolve(root, root);
    for segment in pointer.split('/').skip(1) {
        let segment = segment.replace("~1", "/").replace("~0", "~");
        let next = node
            .get("properties")
            .and_then(|p| p.get(&segment))
            .or_else(|| {
                segment
                    .parse::<usize>()
                    .ok()
                    .and_then(|_| node.get("items"))
            })
            .or_else(|| node.get("additionalProperties").filter(|v| v.is_object()));
        match next {
            Some(n) => node = resolve(root, n),
            None => return Vec::new(),
        }
    }
    node.get("properties")
        .and_then(Value::as_object)
        .map(|p| p.keys().cloned().collect())
        .unwrap_or_default()
}

fn resolve<'a>(root: &'a Value, mut node: &'a Value) -> &'a Value {
    // Local `$ref`s only; schemars writes `#/$defs/Name`.
    for _ in 0..16 {
        match node.get("$ref").and_then(Value::as_str) {
            Some(r) => match r.strip_prefix('#').and_then(|p| root.pointer(p)) {
                Some(target) => node = target,
                None => break,
            },
            None => break,
        }
    }
    node
}
