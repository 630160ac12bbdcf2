//! The tools' output schemas, as served: JSON Schema draft-07 rather than 2020-12.
//!
//! The official Python SDK 1.x (still pinned by many agent frameworks) checks a tool's output
//! schema against its dialect's meta-schema on every call, before it checks the result. With
//! the 2020-12 meta-schema that check costs about 18 ms per call for our 4.9 KB schemas; with
//! draft-07 about 2 ms, the instance check itself about 0.6 ms (`cargo bench --bench
//! client_schema_cost` measures it). Our schemas use nothing draft-07 lacks, so the same
//! schema in the older dialect accepts exactly the same results: only `$defs` is named
//! `definitions` and the `$ref`s follow. A schema that did use a 2020-12-only keyword is
//! served unchanged.

use rmcp::model::JsonObject;
use serde_json::Value;

pub const DRAFT_07: &str = "http://json-schema.org/draft-07/schema#";

/// Keywords whose meaning draft-07 lacks (or differs): a schema using one stays 2020-12.
const ONLY_IN_2019_OR_LATER: [&str; 12] = [
    "$anchor",
    "$dynamicRef",
    "$dynamicAnchor",
    "$recursiveRef",
    "$recursiveAnchor",
    "prefixItems",
    "unevaluatedItems",
    "unevaluatedProperties",
    "dependentSchemas",
    "dependentRequired",
    "minContains",
    "maxContains",
];

/// `schema` in draft-07, or None if it uses what draft-07 cannot say.
pub fn as_draft_07(schema: &JsonObject) -> Option<JsonObject> {
    let mut value = Value::Object(schema.clone());
    if uses_later_keywords(&value) || uses_ref_siblings(&value) {
        return None;
    }
    rename_defs(&mut value);
    let Value::Object(mut object) = value else {
        return None;
    };
    object.insert("$schema".into(), Value::String(DRAFT_07.into()));
    Some(object)
}

fn uses_later_keywords(value: &Value) -> bool {
    match value {
        Value::Object(map) => map.iter().any(|(key, child)| {
            ONLY_IN_2019_OR_LATER.contains(&key.as_str()) || uses_later_keywords(child)
        }),
        Value::Array(items) => items.iter().any(uses_later_keywords),
        _ => false,
    }
}

/// In draft-07 a `$ref` ignores its siblings; in 2020-12 they apply too. A schema that
/// constrains beside a `$ref` would accept more in draft-07: keep it as it is.
fn uses_ref_siblings(value: &Value) -> bool {
    const ANNOTATIONS: [&str; 5] = ["$ref", "description", "title", "default", "examples"];
    match value {
        Value::Object(map) => {
            let constrained =
                map.contains_key("$ref") && map.keys().any(|k| !ANNOTATIONS.contains(&k.as_str()));
            constrained || map.values().any(uses_ref_siblings)
        }
        Value::Array(items) => items.iter().any(uses_ref_siblings),
        _ => false,
    }
}

fn rename_defs(value: &mut Value) {
    match value {
        Value::Object(map) => {
            if let Some(defs) = map.remove("$defs") {
                map.insert("definitions".into(), defs);
            }
            if let Some(Value::String(target)) = map.get_mut("$ref")
                && let Some(name) = target.strip_prefix("#/$defs/")
            {
                *target = format!("#/definitions/{name}");
            }
            map.values_mut().for_each(rename_defs);
        }
        Value::Array(items) => items.iter_mut().for_each(rename_defs),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn object(value: Value) -> JsonObject {
        value.as_object().unwrap().clone()
    }

    #[test]
    fn defs_and_refs_move_to_draft_07_names() {
        let schema = object(json!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$defs": {"Tail": {"type": "object", "properties": {"n": {"type": "integer", "format": "uint64", "minimum": 0}}}},
            "type": "object",
            "properties": {
                "stdout": {"anyOf": [{"$ref": "#/$defs/Tail"}, {"type": "null"}]},
                "items": {"type": "array", "items": {"$ref": "#/$defs/Tail", "description": "one"}}
            }
        }));
        let converted = Value::Object(as_draft_07(&schema).unwrap());
        assert_eq!(converted["$schema"], DRAFT_07);
        assert!(converted.get("$defs").is_none());
        assert_eq!(
            converted["definitions"]["Tail"]["properties"]["n"]["format"],
            "uint64"
        );
        assert_eq!(
            converted["properties"]["stdout"]["anyOf"][0]["$ref"],
            "#/definitions/Tail"
        );
        assert_eq!(
            converted["properties"]["items"]["items"]["$ref"],
            "#/definitions/Tail"
        );
    }

    #[test]
    fn what_draft_07_cannot_say_stays_2020_12() {
        let tuple = object(json!({"type": "array", "prefixItems": [{"type": "string"}]}));
        assert!(as_draft_07(&tuple).is_none());
        let constrained_ref =
            object(json!({"$defs": {"A": {}}, "$ref": "#/$defs/A", "required": ["x"]}));
        assert!(as_draft_07(&constrained_ref).is_none());
    }

    #[test]
    fn every_served_output_schema_converts() {
        let server = crate::mcp::DispatchServer::tool_list_for_tests();
        for tool in server {
            let schema = tool
                .output_schema
                .unwrap_or_else(|| panic!("{} has an output schema", tool.name));
            assert_eq!(
                schema.get("$schema"),
                Some(&json!(DRAFT_07)),
                "{}",
                tool.name
            );
            assert!(
                !Value::Object((*schema).clone())
                    .to_string()
                    .contains("$defs"),
                "{}",
                tool.name
            );
        }
    }
}
