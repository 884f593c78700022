//! Shell completions and help, through the real binary: every verb's `--help` shows an
//! example, and each completion script names the verbs and parses in its shell.

mod support;

use std::process::Command;
use support::cli::Asimov;

/// The verbs `asimov --help` lists (so a new verb is checked without editing this).
fn verbs(a: &Asimov) -> Vec<String> {
    let help = a.ok(&["--help"]);
    let commands = help
        .split("Commands:")
        .nth(1)
        .expect("a Commands: section")
        .split("\n\n")
        .next()
        .unwrap_or_default();
    commands
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|v| *v != "help")
        .map(str::to_string)
        .collect()
}

#[test]
fn every_verb_has_an_example_in_its_help() {
    let a = Asimov::new();
    let verbs = verbs(&a);
    for expected in ["apply", "get", "destroy", "token", "init", "completions"] {
        assert!(
            verbs.iter().any(|v| v == expected),
            "{expected} in {verbs:?}"
        );
    }
    for verb in &verbs {
        let help = a.ok(&[verb, "--help"]);
        assert!(
            help.contains("Example") && help.contains(&format!("asimov {verb}")),
            "`asimov {verb} --help` shows no example:\n{help}"
        );
    }
    let top = a.ok(&["--help"]);
    assert!(top.contains("Examples:"), "{top}");
    for sub in ["set", "rm", "list"] {
        let help = a.ok(&["secret", sub, "--help"]);
        assert!(help.contains("Example"), "secret {sub}: {help}");
    }
}

#[test]
fn completion_scripts_name_the_verbs_and_parse() {
    let a = Asimov::new();
    for shell in ["bash", "zsh", "fish"] {
        let script = a.ok(&["completions", shell]);
        for verb in ["apply", "destroy", "token", "init", "completions"] {
            assert!(script.contains(verb), "{shell} script lacks {verb}");
        }
        let file = a.repo.path().join(format!("asimov.{shell}"));
        std::fs::write(&file, &script).unwrap();
        // Parse-check in the shell itself when it is installed (bash always is).
        let present = Command::new(shell).arg("-c").arg("true").output().is_ok();
        if shell == "bash" {
            assert!(present, "bash is needed");
        }
        if present {
            let out = Command::new(shell).arg("-n").arg(&file).output().unwrap();
            assert!(
                out.status.success(),
                "{shell} -n: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let out = a.run(&["completions", "tcsh"]);
    assert!(!out.status.success());
}
