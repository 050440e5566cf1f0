//! Plausible tool-call arguments from a tool's declared parameter schema (JSON Schema, or
//! Gemini's OpenAPI subset with upper-case type names).

use serde_json::{Map, Number, Value};

/// True if `text` contains `word` as a whole word, ignoring case.
pub fn has_word(text: &str, word: &str) -> bool {
    text.split(|c: char| !c.is_alphanumeric())
        .any(|w| w.eq_ignore_ascii_case(word))
}

/// The place a weather question asks about: the word after "in", else Paris.
pub fn weather_location(text: &str) -> String {
    let words: Vec<&str> = text.split_whitespace().collect();
    words
        .iter()
        .position(|w| w.eq_ignore_ascii_case("in"))
        .and_then(|i| words.get(i + 1))
        .map(|w| w.trim_matches(|c: char| !c.is_alphanumeric()).to_string())
        .filter(|w| !w.is_empty())
        .unwrap_or_else(|| "Paris".into())
}

/// Arguments for a call to a tool with parameters `schema`: a JSON object with a value for every
/// declared property. `context` is the last user message (places and queries come from it).
pub fn plausible(schema: &Value, context: &str) -> Value {
    match value_for("", schema, context, 0) {
        v @ Value::Object(_) => v,
        _ => Value::Object(Map::new()),
    }
}

/// The schema's type, lower-case; from a list the first that is not `null`; guessed when absent.
fn type_of(schema: &Value) -> String {
    let declared = match schema.get("type") {
        Some(Value::String(t)) => Some(t.to_ascii_lowercase()),
        Some(Value::Array(ts)) => ts
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_ascii_lowercase)
            .find(|t| t != "null"),
        _ => None,
    };
    declared.unwrap_or_else(|| {
        if schema.get("properties").is_some() {
            "object".into()
        } else if schema.get("items").is_some() {
            "array".into()
        } else {
            "string".into()
        }
    })
}

fn value_for(name: &str, schema: &Value, context: &str, depth: usize) -> Value {
    if depth > 6 || !schema.is_object() {
        return if depth == 0 {
            Value::Object(Map::new())
        } else {
            Value::String(string_for(name, schema, context))
        };
    }
    if let Some(first) = schema
        .get("enum")
        .and_then(Value::as_array)
        .and_then(|e| e.first())
    {
        return first.clone();
    }
    if let Some(c) = schema.get("const") {
        return c.clone();
    }
    for key in ["anyOf", "oneOf", "any_of", "one_of", "allOf"] {
        if let Some(options) = schema.get(key).and_then(Value::as_array) {
            let pick = options
                .iter()
                .find(|o| o.get("type").and_then(Value::as_str) != Some("null"))
                .or_else(|| options.first());
            if let Some(option) = pick {
                return value_for(name, option, context, depth + 1);
            }
        }
    }
    match type_of(schema).as_str() {
        "object" => {
            let mut out = Map::new();
            if let Some(props) = schema.get("properties").and_then(Value::as_object) {
                for (key, sub) in props {
                    out.insert(key.clone(), value_for(key, sub, context, depth + 1));
                }
            }
            Value::Object(out)
        }
        "array" => {
            let item = schema.get("items").unwrap_or(&Value::Null);
            let singular = name.strip_suffix('s').unwrap_or(name);
            Value::Array(vec![value_for(singular, item, context, depth + 1)])
        }
        "integer" => {
            let min = schema.get("minimum").and_then(Value::as_i64);
            let max = schema.get("maximum").and_then(Value::as_i64);
            let v = min.map_or(1, |m| m.max(1).min(max.unwrap_or(i64::MAX)).max(m));
            Value::Number(v.into())
        }
        "number" => {
            let v = schema
                .get("minimum")
                .and_then(Value::as_f64)
                .map_or(1.5, |m| m.max(1.5));
            Number::from_f64(v).map_or(Value::Null, Value::Number)
        }
        "boolean" => Value::Bool(true),
        "null" => Value::Null,
        _ => Value::String(string_for(name, schema, context)),
    }
}

fn string_for(name: &str, schema: &Value, context: &str) -> String {
    match schema.get("format").and_then(Value::as_str) {
        Some("date") => return "2025-01-01".into(),
        Some("date-time") => return "2025-01-01T12:00:00Z".into(),
        Some("email") => return "mock@example.com".into(),
        Some("uri" | "url") => return "https://example.com/".into(),
        _ => {}
    }
    let lname = name.to_ascii_lowercase();
    let is = |words: &[&str]| words.iter().any(|w| lname.contains(w));
    if is(&[
        "location", "city", "place", "where", "address", "region", "country", "town",
    ]) {
        weather_location(context)
    } else if is(&["unit"]) {
        "celsius".into()
    } else if is(&[
        "query", "text", "prompt", "question", "search", "input", "message", "content",
    ]) || lname == "q"
    {
        if context.trim().is_empty() {
            "mock".into()
        } else {
            context.to_string()
        }
    } else if name.is_empty() {
        "mock".into()
    } else {
        format!("mock-{name}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn fills_every_property_by_type() {
        let schema = json!({"type": "object", "properties": {
            "location": {"type": "string"}, "unit": {"type": "string", "enum": ["fahrenheit", "celsius"]},
            "days": {"type": "integer", "minimum": 3}, "detailed": {"type": "boolean"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "filter": {"type": "object", "properties": {"query": {"type": ["string", "null"]}}},
            "ratio": {"type": "number"}}});
        let v = plausible(&schema, "weather in Oslo please");
        assert_eq!(
            v,
            json!({"location": "Oslo", "unit": "fahrenheit", "days": 3, "detailed": true,
                "tags": ["mock-tag"], "filter": {"query": "weather in Oslo please"}, "ratio": 1.5})
        );
    }

    #[test]
    fn reads_gemini_upper_case_types_and_no_schema() {
        let schema = json!({"type": "OBJECT", "properties": {"city": {"type": "STRING"}, "n": {"type": "INTEGER"}}});
        assert_eq!(plausible(&schema, "x"), json!({"city": "Paris", "n": 1}));
        assert_eq!(plausible(&Value::Null, "x"), json!({}));
        assert_eq!(plausible(&json!({"type": "object"}), "x"), json!({}));
    }
}
