//! A request as the helper handles it: decoded from the wire, then every field validated by the
//! policy crate and resolved against an allowlist, and the task rendered into the fixed argv.
//! Whatever passes must land in the argv as exactly one element, unchanged, never as argv[0].
#![no_main]

use dispatch_policy::{Allowlist, ArgvTemplate, Handle, Task, TemplateValues, validate_name};
use dispatch_proto::codec::decode;
use dispatch_proto::{Request, RequestEnvelope};
use libfuzzer_sys::fuzz_target;
use std::sync::LazyLock;

static POLICY: LazyLock<(Allowlist, ArgvTemplate)> = LazyLock::new(|| {
    let allowlist = Allowlist::parse(
        r#"{"orgs": {"acme": {"unix_user": "acme"}, "globex": {}},
            "repos": {"widgets": {"org": "acme", "github": "acme/widgets"},
                      "gadgets": {"org": "globex"}}}"#,
        "fuzz",
    )
    .expect("the fixed allowlist parses")
    .allowlist;
    let argv = ["/bin/true", "{orguser}", "{repo}", "{task}", "--host", "{host}", "--max", "{max_iterations}"];
    let template = ArgvTemplate::parse(&argv, None).expect("the fixed template parses");
    (allowlist, template)
});

fuzz_target!(|data: &[u8]| {
    let Ok(envelope) = decode::<RequestEnvelope>(data) else {
        return;
    };
    match envelope.body {
        Request::Dispatch(request) => dispatch(&request.orguser, &request.repo, &request.task),
        Request::Status { handle, .. } | Request::Cancel { handle } | Request::Delete { handle } => {
            let _ = Handle::parse(&handle);
        }
        Request::Result { handle, .. } => {
            let _ = Handle::parse(&handle);
        }
        _ => {}
    }
});

fn dispatch(orguser: &str, repo: &str, task: &str) {
    let _ = validate_name("orguser", orguser);
    let _ = validate_name("repo", repo);
    let Ok(task) = Task::parse(task) else {
        return;
    };
    let _ = task.is_option_like();
    let (allowlist, template) = &*POLICY;
    let Ok((org, target)) = allowlist.resolve(orguser, repo) else {
        return;
    };
    let handle = Handle::parse("d-0123456789abcdef0123456789abcdef").expect("a valid handle");
    let argv = template.render(&TemplateValues {
        orguser: &org.orguser,
        repo: &target.repo,
        github: &target.github,
        task: &task,
        host: "localhost",
        max_iterations: 50,
        handle: &handle,
    });
    assert_eq!(argv[0], "/bin/true");
    let exact = argv.iter().filter(|a| a.as_str() == task.as_str()).count();
    assert!(exact >= 1, "the task is one argv element, unchanged");
    assert!(argv.iter().all(|a| !a.contains('\0')));
}
