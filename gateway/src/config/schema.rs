//! The policy file's JSON Schema, generated from the types the file is read into (so it cannot
//! drift from the parser), committed as `configs/tollgate.schema.json` for editors, and used by
//! `tollgate config check` before the semantic checks.

use super::positions::PositionIndex;
use super::{ConfigError, PolicyFile};
use serde_json::Value;

pub fn schema() -> Value {
    let mut schema =
        serde_json::to_value(schemars::schema_for!(PolicyFile)).expect("schema serializes");
    schema["title"] = Value::from("Tollgate policy file");
    schema
}

/// Every place where `text` (YAML) breaks the schema, with line and column.
pub fn check(text: &str) -> Vec<ConfigError> {
    let value: Value = match serde_yaml::from_str::<Option<Value>>(text) {
        Ok(v) => v.unwrap_or_else(|| Value::Object(Default::default())),
        Err(e) => {
            let at = e.location();
            return vec![ConfigError {
                line: at.as_ref().map(|l| l.line()),
                col: at.as_ref().map(|l| l.column()),
                path: String::new(),
                message: e.to_string(),
            }];
        }
    };
    let index = PositionIndex::build(text);
    validator()
        .iter_errors(&value)
        .map(|e| {
            let path = dotted(&e.instance_path().to_string());
            let position = index.find(&path);
            ConfigError {
                line: position.map(|p| p.line),
                col: position.map(|p| p.col),
                path,
                message: e.to_string(),
            }
        })
        .collect()
}

/// The schema's validator, built once.
fn validator() -> &'static jsonschema::Validator {
    static VALIDATOR: std::sync::OnceLock<jsonschema::Validator> = std::sync::OnceLock::new();
    VALIDATOR.get_or_init(|| {
        jsonschema::validator_for(&schema()).expect("the generated schema is valid")
    })
}

/// JSON pointer `/tenants/0/budgets` to the dotted path `tenants[0].budgets` used everywhere else.
fn dotted(pointer: &str) -> String {
    let mut out = String::new();
    for part in pointer.split('/').skip(1) {
        let part = part.replace("~1", "/").replace("~0", "~");
        if part.chars().all(|c| c.is_ascii_digit()) && !part.is_empty() {
            out.push_str(&format!("[{part}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(&part);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_schema_is_the_generated_one() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../configs/tollgate.schema.json"
        );
        let committed: Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert!(
            committed == schema(),
            "configs/tollgate.schema.json is stale: run `tollgate config schema > configs/tollgate.schema.json`"
        );
    }

    #[test]
    fn schema_errors_carry_positions() {
        let text = "database_url: sqlite://x.db\nbackends:\n  - name: a\n    kind: remote\nmodels: []\ntenants:\n  - name: t\n    budgets:\n      - { limit_usd: 5, period: yearly }\n";
        let errors = check(text);
        let find = |p: &str| {
            errors
                .iter()
                .find(|e| e.path == p)
                .unwrap_or_else(|| panic!("{p}: {errors:#?}"))
        };
        assert_eq!(find("backends[0].kind").line, Some(4));
        assert_eq!(find("tenants[0].budgets[0].period").line, Some(9));
        assert!(check("database_url: sqlite://x.db\nbogus: 1\n")
            .iter()
            .any(|e| e.message.contains("bogus")));
    }

    /// The policy fuzz target's first crash (`tests/fuzz/corpus/policy/cr-line-breaks`): YAML
    /// breaks lines at a lone CR too, so an error can be on line 3 of a text without LF.
    #[test]
    fn a_lone_cr_is_a_line_break() {
        let text = "m:$:\rm$\rz";
        for errors in [
            check(text),
            super::super::Policy::from_yaml(text).unwrap_err(),
        ] {
            assert_eq!(errors.len(), 1, "{errors:?}");
            assert_eq!((errors[0].line, errors[0].col), (Some(3), Some(1)));
        }
    }
}
