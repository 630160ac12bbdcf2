//! The `.repos.json` allowlist parser: any text is an allowlist or an error, never a panic, and
//! every target it accepts resolves to itself under its own org.
#![no_main]

use dispatch_policy::Allowlist;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(loaded) = Allowlist::parse(text, "fuzz") else {
        return;
    };
    let allowlist = loaded.allowlist;
    for target in allowlist.targets() {
        let (org, resolved) = allowlist
            .resolve(target.orguser.as_str(), target.repo.as_str())
            .expect("an accepted target resolves");
        assert_eq!(org.orguser, target.orguser);
        assert_eq!(resolved.repo, target.repo);
    }
    let _ = allowlist.known_targets();
});
