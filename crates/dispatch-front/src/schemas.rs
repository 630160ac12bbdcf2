//! The tools' output schemas in JSON Schema draft-07, for the clients that check them fastest
//! that way.
//!
//! The official Python SDK 1.x (still pinned by many agent frameworks) checks a tool's output
//! schema against its dialect's meta-schema on every call, before it checks the result. With
//! the 2020-12 meta-schema that costs about 13 ms per call for our 4.9 KB schemas; with
//! draft-07 about 3 ms (`cargo bench --bench client_schema_cost` measures it). Our schemas use
//! nothing draft-07 reads differently, so the same schema in the older dialect accepts exactly
//! the same results: only `$defs` is named `definitions` and the `$ref`s follow.
//!
//! 2020-12 is the dialect every MCP client must support, and some accept no other: it stays
//! the default. Draft-07 goes to the Python SDKs (their default client name, `mcp`; both
//! majors are tested with it), and to any client when `DISPATCH_OUTPUT_SCHEMAS=draft-07`.

use rmcp::model::JsonObject;
use serde_json::Value;

pub const DRAFT_07: &str = "http://json-schema.org/draft-07/schema#";

/// Whether this client gets the draft-07 schemas: `DISPATCH_OUTPUT_SCHEMAS` (`draft-07` or
/// `2020-12`) decides if set, else the client's name.
pub fn wants_draft_07(client: Option<&rmcp::model::Implementation>) -> bool {
    choose(
        std::env::var("DISPATCH_OUTPUT_SCHEMAS").ok().as_deref(),
        client.map(|c| c.name.as_str()),
    )
}

fn choose(setting: Option<&str>, client_name: Option<&str>) -> bool {
    match setting.map(str::trim) {
        Some("draft-07") => true,
        Some("2020-12") => false,
        _ => client_name == Some("mcp"),
    }
}

/// Keywords whose meaning draft-07 lacks, or that draft-07 enforces and 2020-12 ignores: a
/// schema using one stays 2020-12.
const NOT_THE_SAME_IN_DRAFT_07: [&str; 14] = [
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
    "dependencies",
    "additionalItems",
];

/// What may stand beside a `$ref`: draft-07 ignores a `$ref`'s siblings, 2020-12 applies them,
/// so only annotations may.
const ANNOTATIONS: [&str; 5] = ["$ref", "description", "title", "default", "examples"];

/// Keywords whose value is one subschema, a list of them, or a map of names to them; every
/// other keyword's value is data (`const`, `enum`, `default`, …) and is never looked into.
const ONE_SCHEMA: [&str; 8] = [
    "items",
    "contains",
    "additionalProperties",
    "propertyNames",
    "not",
    "if",
    "then",
    "else",
];
const SCHEMA_LISTS: [&str; 3] = ["allOf", "anyOf", "oneOf"];
const SCHEMA_MAPS: [&str; 4] = ["properties", "patternProperties", "$defs", "definitions"];

/// `schema` in draft-07, or None if it uses what draft-07 would read differently.
pub fn as_draft_07(schema: &JsonObject) -> Option<JsonObject> {
    if !same_in_draft_07(&Value::Object(schema.clone()), true) {
        return None;
    }
    let mut converted = Value::Object(schema.clone());
    move_refs(&mut converted);
    let Value::Object(mut object) = converted else {
        return None;
    };
    if let Some(defs) = object.remove("$defs") {
        object.insert("definitions".into(), defs);
    }
    object.insert("$schema".into(), Value::String(DRAFT_07.into()));
    Some(object)
}

/// Each subschema position of `schema`.
fn subschemas(schema: &serde_json::Map<String, Value>) -> Vec<&Value> {
    let mut found = Vec::new();
    for (key, value) in schema {
        let key = key.as_str();
        if ONE_SCHEMA.contains(&key) {
            found.push(value);
        } else if SCHEMA_LISTS.contains(&key) {
            found.extend(value.as_array().into_iter().flatten());
        } else if SCHEMA_MAPS.contains(&key) {
            found.extend(value.as_object().into_iter().flat_map(|m| m.values()));
        }
    }
    found
}

/// The same, mutable.
fn subschemas_mut(schema: &mut serde_json::Map<String, Value>) -> Vec<&mut Value> {
    let mut found = Vec::new();
    for (key, value) in schema.iter_mut() {
        let key = key.as_str();
        if ONE_SCHEMA.contains(&key) {
            found.push(value);
        } else if SCHEMA_LISTS.contains(&key) {
            found.extend(value.as_array_mut().into_iter().flatten());
        } else if SCHEMA_MAPS.contains(&key) {
            found.extend(
                value
                    .as_object_mut()
                    .into_iter()
                    .flat_map(|m| m.values_mut()),
            );
        }
    }
    found
}

/// Whether `schema` reads the same in draft-07: no keyword from the list above, `items` a
/// single schema, `$defs` only at the top, and every `$ref` a bare reference to one of them.
fn same_in_draft_07(schema: &Value, top: bool) -> bool {
    let Some(map) = schema.as_object() else {
        return schema.is_boolean();
    };
    let plain_ref = |target: &Value| {
        target
            .as_str()
            .and_then(|t| t.strip_prefix("#/$defs/"))
            .is_some_and(|name| !name.contains('/') && !name.contains('~'))
    };
    let fine = map.iter().all(|(key, value)| match key.as_str() {
        key if NOT_THE_SAME_IN_DRAFT_07.contains(&key) => false,
        "items" => !value.is_array(),
        "$defs" => top,
        "$ref" => plain_ref(value) && map.keys().all(|k| ANNOTATIONS.contains(&k.as_str())),
        _ => true,
    });
    fine && subschemas(map)
        .into_iter()
        .all(|sub| same_in_draft_07(sub, false))
}

fn move_refs(schema: &mut Value) {
    let Some(map) = schema.as_object_mut() else {
        return;
    };
    if let Some(Value::String(target)) = map.get_mut("$ref")
        && let Some(name) = target.strip_prefix("#/$defs/")
    {
        *target = format!("#/definitions/{name}");
    }
    for sub in subschemas_mut(map) {
        move_refs(sub);
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
    fn the_python_sdks_get_draft_07_unless_told_otherwise() {
        assert!(choose(None, Some("mcp")));
        assert!(!choose(None, Some("mcp-inspector")));
        assert!(!choose(None, None));
        assert!(choose(Some("draft-07"), Some("claude-code")));
        assert!(!choose(Some("2020-12"), Some("mcp")));
        assert!(
            choose(Some("bogus"), Some("mcp")),
            "an unknown setting is the default"
        );
    }

    #[test]
    fn data_and_property_names_are_left_alone() {
        let schema = object(json!({
            "$defs": {"A": {"type": "string"}},
            "type": "object",
            "properties": {
                "$defs": {"type": "string", "const": "#/$defs/A"},
                "kind": {"enum": [{"$ref": "#/$defs/A"}]},
                "a": {"$ref": "#/$defs/A"}
            }
        }));
        let converted = Value::Object(as_draft_07(&schema).unwrap());
        assert_eq!(converted["properties"]["$defs"]["const"], "#/$defs/A");
        assert_eq!(
            converted["properties"]["kind"]["enum"][0]["$ref"],
            "#/$defs/A"
        );
        assert_eq!(converted["properties"]["a"]["$ref"], "#/definitions/A");
    }

    #[test]
    fn what_draft_07_cannot_say_stays_2020_12() {
        for schema in [
            json!({"type": "array", "items": [{"type": "string"}]}),
            json!({"type": "object", "dependencies": {"a": ["b"]}}),
            json!({"$defs": {"A": {"$defs": {"B": {}}}}, "$ref": "#/$defs/A"}),
            json!({"$defs": {"A": {}}, "properties": {"x": {"$ref": "#/$defs/A/properties/y"}}}),
            json!({"properties": {"x": {"$ref": "https://example.com/s"}}}),
        ] {
            assert!(as_draft_07(&object(schema.clone())).is_none(), "{schema}");
        }
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
