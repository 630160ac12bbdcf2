//! The policy shared by both sides: what a valid name and task are, which org-user/repo lanes
//! exist (the `.repos.json` allowlist), and how the fixed dispatch argv is built.
//!
//! The front uses it to give early, friendly errors. The helper's copy is the one that decides:
//! it re-validates everything the front sends against its own allowlist and its own template.
#![forbid(unsafe_code)]

mod allowlist;
mod error;
mod names;
mod task;
mod template;

pub use allowlist::{AllowedClients, Allowlist, LoadedAllowlist, OrgPolicy, Target};
pub use error::{PolicyError, escape_value};
pub use names::{Handle, NAME_RULE, OrgUser, RepoName, UnixUserName, validate_name};
pub use task::{MAX_TASK_CHARS, Task};
pub use template::{ArgvTemplate, DEFAULT_TEMPLATE, Placeholder, TemplateError, TemplateValues};
