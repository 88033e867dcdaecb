//! The README's Settings table says what `outboxd run --help` says: the same variables,
//! and for each the same default. The defaults are defined once, in
//! `outboxd::config::defaults` (and the binary's own settings), and the help shows what
//! clap was given; this test keeps the table from drifting away from both.

use std::collections::BTreeMap;

use crate::harness::{outboxd_command, run_to_end};

const README: &str = include_str!("../../README.md");

/// Variables the table documents that are not flags of `outboxd run`.
const NOT_FLAGS: &[&str] = &["RUST_LOG"];

/// Each variable of `outboxd run --help` with the default clap shows for it (`None`
/// when it has none). An option's text runs from its `--flag` line to the next one;
/// clap writes `[env: NAME=value]` and then, if there is one, `[default: value]`,
/// wrapping lines anywhere.
fn help_defaults(help: &str) -> BTreeMap<String, Option<String>> {
    let env = regex::Regex::new(r"\[env: ([A-Z0-9_]+)(?:=[^\]]*)?\]( \[default: ([^\]]*)\])?")
        .expect("a valid pattern");
    let mut options: Vec<String> = Vec::new();
    for line in help.lines() {
        let line = line.trim();
        if line.starts_with('-') {
            options.push(String::new());
        }
        if let Some(option) = options.last_mut() {
            option.push(' ');
            option.push_str(line);
        }
    }
    options
        .iter()
        .filter_map(|option| {
            let found = env.captures(option)?;
            let default = found.get(3).map(|d| d.as_str().to_owned());
            Some((found[1].to_owned(), default))
        })
        .collect()
}

/// Each variable of the README's Settings table with its Default cell.
fn readme_defaults() -> BTreeMap<String, String> {
    let section = README
        .split("\n## Settings\n")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .expect("the README has a Settings section");
    section
        .lines()
        .filter(|line| line.starts_with("| `"))
        .map(|line| {
            let cells: Vec<&str> = line.split(" | ").collect();
            let variable = cells[0].trim_start_matches("| ").trim_matches('`');
            (variable.to_owned(), cells[1].trim().to_owned())
        })
        .collect()
}

/// A cell's stated default: its leading `code` span, if it starts with one. Other
/// cells describe a default that is not a value ("(off)", "CPUs available").
fn stated_value(cell: &str) -> Option<&str> {
    cell.strip_prefix('`')?.split('`').next()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_table_states_the_binarys_defaults() {
    let mut command = outboxd_command();
    command.args(["run", "--help"]);
    let finished = run_to_end(command).await;
    assert_eq!(finished.code, Some(0), "{finished:?}");
    let help = help_defaults(&finished.stdout);
    let readme = readme_defaults();
    assert!(help.len() > 20, "the help was not understood: {help:?}");

    let flags: Vec<&String> = help.keys().collect();
    let documented: Vec<&String> = readme
        .keys()
        .filter(|v| !NOT_FLAGS.contains(&v.as_str()))
        .collect();
    assert_eq!(
        documented, flags,
        "the README's Settings table and `outboxd run --help` list different variables"
    );
    for (variable, default) in &help {
        let cell = &readme[variable];
        assert_eq!(
            stated_value(cell),
            default.as_deref(),
            "{variable}: the README states {cell:?}, `outboxd run --help` [default: {}]",
            default.as_deref().unwrap_or("none")
        );
    }
}

/// The parsers read what clap and the README write, wrapped lines included.
#[test]
fn the_parsers_read_both_forms() {
    let help = "Options:\n      --database-url <DATABASE_URL>\n          A string [env: DATABASE_URL]\n      \
                --batch-size <WEBHOOK_BATCH_SIZE>\n          Most per round trip [env:\n          \
                WEBHOOK_BATCH_SIZE=] [default:\n          200]\n  -h, --help\n          Print help\n";
    let parsed = help_defaults(help);
    assert_eq!(parsed["DATABASE_URL"], None);
    assert_eq!(parsed["WEBHOOK_BATCH_SIZE"].as_deref(), Some("200"));
    assert_eq!(parsed.len(), 2);
    assert_eq!(stated_value("`36000000` (10 h)"), Some("36000000"));
    assert_eq!(stated_value("(off)"), None);
    assert_eq!(stated_value("CPUs available"), None);
}
