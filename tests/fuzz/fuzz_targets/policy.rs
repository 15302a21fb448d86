//! The policy file on arbitrary text: parsed and validated (all errors, with positions), checked
//! against the JSON Schema like `tollgate config check` does, and a valid policy diffed with
//! itself. Nothing may panic; positions point inside the text.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_gateway::config::{diff, schema, Policy};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // YAML breaks lines at LF, CRLF, a lone CR and (libyaml) NEL, LS and PS; the first crash
    // found was this target counting only LF.
    let breaks = ['\n', '\r', '\u{85}', '\u{2028}', '\u{2029}'];
    let lines = text.replace("\r\n", "\n").matches(breaks).count() + 2;
    match Policy::from_yaml(text) {
        Ok(policy) => assert!(diff(&policy, &policy).is_empty()),
        Err(errors) => {
            assert!(!errors.is_empty());
            for error in errors {
                assert!(error.line.is_none_or(|line| line <= lines), "{error}");
            }
        }
    }
    for error in schema::check(text) {
        assert!(error.line.is_none_or(|line| line <= lines), "{error}");
    }
});
