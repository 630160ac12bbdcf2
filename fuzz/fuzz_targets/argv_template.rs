//! The argv template, as the administrator writes it (elements separated by NUL here), and its
//! rendering with a task taken from the same input: a template that parses has exactly one
//! `{task}`, an absolute program, and renders the task as exactly one unchanged element.
#![no_main]

use dispatch_policy::{ArgvTemplate, Handle, OrgUser, RepoName, Task, TemplateValues};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // The last line is the task; the rest, NUL-separated, the template.
    let (template, task) = text.rsplit_once('\n').unwrap_or((text, "a task"));
    let elements: Vec<&str> = template.split('\0').collect();
    let Ok(parsed) = ArgvTemplate::parse(&elements, Some("/usr/bin:/bin".as_ref())) else {
        return;
    };
    assert!(parsed.program().is_absolute());
    let Ok(task) = Task::parse(task) else {
        return;
    };
    let orguser = OrgUser::parse("acme").expect("valid");
    let repo = RepoName::parse("widgets").expect("valid");
    let handle = Handle::parse("d-0123456789abcdef0123456789abcdef").expect("valid");
    let argv = parsed.render(&TemplateValues {
        orguser: &orguser,
        repo: &repo,
        github: "acme/widgets",
        task: &task,
        host: "localhost",
        max_iterations: 50,
        handle: &handle,
    });
    assert_eq!(argv[0], parsed.program().display().to_string());
    assert!(argv.iter().any(|a| a.as_str() == task.as_str()), "the task is one element");
});
