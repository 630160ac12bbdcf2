//! The dispatch argv template: a list of strings the administrator writes, never a caller.
//!
//! Placeholders stand only as whole elements, so a value can never be spliced into a larger
//! string and change how it is parsed; `{task}` appears exactly once, so the task is exactly one
//! argv element; argv[0] is a literal resolved to an absolute path when the config is loaded, so
//! nothing is ever looked up through PATH at exec time.

use crate::names::{Handle, OrgUser, RepoName};
use crate::task::Task;
use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// The Python server's template.
pub const DEFAULT_TEMPLATE: &[&str] = &[
    "dotfiles-dispatch",
    "{orguser}",
    "{repo}",
    "{task}",
    "--host",
    "{host}",
    "--max",
    "{max_iterations}",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placeholder {
    OrgUser,
    Repo,
    Github,
    Task,
    Host,
    MaxIterations,
    Handle,
}

impl Placeholder {
    const ALL: [(&'static str, Placeholder); 7] = [
        ("{orguser}", Placeholder::OrgUser),
        ("{repo}", Placeholder::Repo),
        ("{github}", Placeholder::Github),
        ("{task}", Placeholder::Task),
        ("{host}", Placeholder::Host),
        ("{max_iterations}", Placeholder::MaxIterations),
        ("{handle}", Placeholder::Handle),
    ];

    fn from_element(element: &str) -> Option<Placeholder> {
        Self::ALL
            .iter()
            .find(|(text, _)| *text == element)
            .map(|(_, p)| *p)
    }

    fn known() -> String {
        Self::ALL
            .iter()
            .map(|(text, _)| *text)
            .collect::<Vec<_>>()
            .join(" ")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Element {
    Literal(String),
    Placeholder(Placeholder),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("argv template is empty")]
    Empty,
    #[error(
        "argv template element {index} {element:?} embeds a placeholder or a brace; placeholders \
         ({known}) may only stand as whole elements"
    )]
    EmbeddedPlaceholder {
        index: usize,
        element: String,
        known: String,
    },
    #[error("argv template element {index} {element:?} is not a known placeholder ({known})")]
    UnknownPlaceholder {
        index: usize,
        element: String,
        known: String,
    },
    #[error("argv template must contain {{task}} exactly once; it contains it {count} times")]
    TaskCount { count: usize },
    #[error("argv[0] must be a literal program, not the placeholder {element:?}")]
    ProgramIsPlaceholder { element: String },
    #[error(
        "argv[0] {program:?} is a relative path; give an absolute path or a bare name found on PATH"
    )]
    RelativeProgram { program: String },
    #[error("argv[0] {program:?} was not found on PATH ({path})")]
    ProgramNotOnPath { program: String, path: String },
    #[error("argv[0] {program:?} does not exist or is not an executable regular file")]
    ProgramMissing { program: String },
    #[error("argv template element {index} contains a NUL byte")]
    Nul { index: usize },
}

/// The values a caller's (validated) request contributes, plus the helper's own settings.
pub struct TemplateValues<'a> {
    pub orguser: &'a OrgUser,
    pub repo: &'a RepoName,
    pub github: &'a str,
    pub task: &'a Task,
    pub host: &'a str,
    pub max_iterations: u32,
    pub handle: &'a Handle,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArgvTemplate {
    program: PathBuf,
    args: Vec<Element>,
}

impl ArgvTemplate {
    /// Parse and check a template. `search_path` is the PATH used to resolve a bare argv[0]
    /// now, at load time.
    pub fn parse<S: AsRef<str>>(
        elements: &[S],
        search_path: Option<&OsStr>,
    ) -> Result<Self, TemplateError> {
        let (first, rest) = elements.split_first().ok_or(TemplateError::Empty)?;
        let mut parsed = Vec::with_capacity(elements.len());
        for (index, element) in elements.iter().enumerate() {
            parsed.push(parse_element(index, element.as_ref())?);
        }
        let task_count = parsed
            .iter()
            .filter(|e| **e == Element::Placeholder(Placeholder::Task))
            .count();
        if task_count != 1 {
            return Err(TemplateError::TaskCount { count: task_count });
        }
        if let Element::Placeholder(_) = parsed[0] {
            return Err(TemplateError::ProgramIsPlaceholder {
                element: first.as_ref().to_owned(),
            });
        }
        let program = resolve_program(first.as_ref(), search_path)?;
        debug_assert_eq!(rest.len(), parsed.len() - 1);
        Ok(ArgvTemplate {
            program,
            args: parsed.split_off(1),
        })
    }

    pub fn program(&self) -> &Path {
        &self.program
    }

    /// The full argv: the absolute program, then each element with its value substituted.
    pub fn render(&self, values: &TemplateValues<'_>) -> Vec<String> {
        let mut argv = Vec::with_capacity(self.args.len() + 1);
        argv.push(self.program.to_string_lossy().into_owned());
        for element in &self.args {
            argv.push(match element {
                Element::Literal(text) => text.clone(),
                Element::Placeholder(Placeholder::OrgUser) => values.orguser.to_string(),
                Element::Placeholder(Placeholder::Repo) => values.repo.to_string(),
                Element::Placeholder(Placeholder::Github) => values.github.to_owned(),
                Element::Placeholder(Placeholder::Task) => values.task.as_str().to_owned(),
                Element::Placeholder(Placeholder::Host) => values.host.to_owned(),
                Element::Placeholder(Placeholder::MaxIterations) => {
                    values.max_iterations.to_string()
                }
                Element::Placeholder(Placeholder::Handle) => values.handle.to_string(),
            });
        }
        argv
    }
}

fn parse_element(index: usize, element: &str) -> Result<Element, TemplateError> {
    if element.contains('\0') {
        return Err(TemplateError::Nul { index });
    }
    if let Some(placeholder) = Placeholder::from_element(element) {
        return Ok(Element::Placeholder(placeholder));
    }
    let braces = element.contains('{') || element.contains('}');
    if braces
        && element.starts_with('{')
        && element.ends_with('}')
        && element.matches('{').count() == 1
    {
        return Err(TemplateError::UnknownPlaceholder {
            index,
            element: element.to_owned(),
            known: Placeholder::known(),
        });
    }
    if braces {
        return Err(TemplateError::EmbeddedPlaceholder {
            index,
            element: element.to_owned(),
            known: Placeholder::known(),
        });
    }
    Ok(Element::Literal(element.to_owned()))
}

fn resolve_program(program: &str, search_path: Option<&OsStr>) -> Result<PathBuf, TemplateError> {
    if program.contains('/') {
        let path = Path::new(program);
        if !path.is_absolute() {
            return Err(TemplateError::RelativeProgram {
                program: program.to_owned(),
            });
        }
        return if is_executable_file(path) {
            Ok(path.to_owned())
        } else {
            Err(TemplateError::ProgramMissing {
                program: program.to_owned(),
            })
        };
    }
    let search = search_path.unwrap_or_default();
    std::env::split_paths(search)
        .filter(|dir| dir.is_absolute())
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable_file(candidate))
        .ok_or_else(|| TemplateError::ProgramNotOnPath {
            program: program.to_owned(),
            path: search.to_string_lossy().into_owned(),
        })
}

fn is_executable_file(path: &Path) -> bool {
    std::fs::metadata(path)
        .map(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values<'a>(
        orguser: &'a OrgUser,
        repo: &'a RepoName,
        task: &'a Task,
        handle: &'a Handle,
    ) -> TemplateValues<'a> {
        TemplateValues {
            orguser,
            repo,
            github: "acme/widgets",
            task,
            host: "localhost",
            max_iterations: 50,
            handle,
        }
    }

    fn fake_path_with(name: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let program = dir.path().join(name);
        std::fs::write(&program, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
        (dir, program)
    }

    #[test]
    fn default_template_resolves_through_path_at_load_and_renders_the_task_as_one_element() {
        let (dir, program) = fake_path_with("dotfiles-dispatch");
        let search = std::env::join_paths(["relative/ignored".as_ref(), dir.path()]).unwrap();
        let template = ArgvTemplate::parse(DEFAULT_TEMPLATE, Some(&search)).unwrap();
        assert_eq!(template.program(), program);
        let (o, r, h) = (
            OrgUser::parse("acme").unwrap(),
            RepoName::parse("widgets").unwrap(),
            Handle::parse("d-1").unwrap(),
        );
        let task = Task::parse("$(rm -rf /) --help; echo 'x'").unwrap();
        let argv = template.render(&values(&o, &r, &task, &h));
        assert_eq!(
            argv,
            [
                program.to_str().unwrap(),
                "acme",
                "widgets",
                "$(rm -rf /) --help; echo 'x'",
                "--host",
                "localhost",
                "--max",
                "50"
            ]
        );
    }

    #[test]
    fn embedded_placeholder_is_refused() {
        let err = ArgvTemplate::parse(&["/bin/echo", "--repo={repo}", "{task}"], None).unwrap_err();
        assert!(
            matches!(err, TemplateError::EmbeddedPlaceholder { index: 1, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("whole elements"), "{err}");
        let err = ArgvTemplate::parse(&["/bin/echo", "{task}x"], None).unwrap_err();
        assert!(
            matches!(err, TemplateError::EmbeddedPlaceholder { .. }),
            "{err}"
        );
    }

    #[test]
    fn unknown_placeholder_is_refused() {
        let err = ArgvTemplate::parse(&["/bin/echo", "{cmd}", "{task}"], None).unwrap_err();
        assert!(
            err.to_string()
                .contains("\"{cmd}\" is not a known placeholder"),
            "{err}"
        );
    }

    #[test]
    fn task_must_appear_exactly_once() {
        let err = ArgvTemplate::parse(&["/bin/echo", "{task}", "{task}"], None).unwrap_err();
        assert_eq!(err, TemplateError::TaskCount { count: 2 });
        let err = ArgvTemplate::parse(&["/bin/echo", "{repo}"], None).unwrap_err();
        assert_eq!(err, TemplateError::TaskCount { count: 0 });
    }

    #[test]
    fn relative_program_is_refused() {
        let err = ArgvTemplate::parse(&["bin/echo", "{task}"], None).unwrap_err();
        assert!(
            matches!(err, TemplateError::RelativeProgram { .. }),
            "{err}"
        );
        let err = ArgvTemplate::parse(&["./echo", "{task}"], None).unwrap_err();
        assert!(
            matches!(err, TemplateError::RelativeProgram { .. }),
            "{err}"
        );
    }

    #[test]
    fn missing_program_is_refused() {
        let err = ArgvTemplate::parse(&["/nonexistent/dispatch", "{task}"], None).unwrap_err();
        assert!(matches!(err, TemplateError::ProgramMissing { .. }), "{err}");
        let empty = tempfile::tempdir().unwrap();
        let err = ArgvTemplate::parse(
            &["dotfiles-dispatch", "{task}"],
            Some(empty.path().as_os_str()),
        )
        .unwrap_err();
        assert!(err.to_string().contains("was not found on PATH"), "{err}");
        let (_dir, not_executable) = fake_path_with("plain");
        std::fs::set_permissions(&not_executable, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err =
            ArgvTemplate::parse(&[not_executable.to_str().unwrap(), "{task}"], None).unwrap_err();
        assert!(
            matches!(err, TemplateError::ProgramMissing { .. }),
            "not executable: {err}"
        );
    }

    #[test]
    fn program_cannot_be_a_placeholder_and_template_cannot_be_empty() {
        let err = ArgvTemplate::parse(&["{task}"], None).unwrap_err();
        assert!(
            matches!(err, TemplateError::ProgramIsPlaceholder { .. }),
            "{err}"
        );
        let err = ArgvTemplate::parse::<&str>(&[], None).unwrap_err();
        assert_eq!(err, TemplateError::Empty);
    }
}
