//! The helper's TOML configuration as parsed at load and reload, and the checks that need no
//! filesystem: host, limits. Any text is a configuration or an error, never a panic.
#![no_main]

use dispatch_helper::config::{ConfigFile, validate_host};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(file) = toml::from_str::<ConfigFile>(text) else {
        return;
    };
    let _ = validate_host(&file.host);
    let _ = file.sandbox.limits.validate();
    let _ = file.sandbox.limits.report(None, false);
});
