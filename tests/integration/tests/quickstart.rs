//! The README's local quick start with `--tiny`, run as a user runs it (with the binaries this
//! test run built, instead of a release build): the adapter answers the trained questions, the
//! base model does not. The quick start on the real model (SmolLM2, trained in release
//! binaries) is a stage of `.ci/run`.

use std::process::Command;

use graft_testenv::{repo_root, workspace_binary};

#[test]
fn the_quick_start_trains_serves_and_shows_the_adapter_answering() {
    let trainer = workspace_binary("graft-trainer");
    workspace_binary("graft-server");
    let bin_dir = trainer.parent().expect("the binaries' directory");
    let work = std::env::temp_dir().join(format!("graft-quickstart-test-{}", std::process::id()));
    let output = Command::new("bash")
        .arg(repo_root().join("quickstart.sh"))
        .arg("--tiny")
        .env("GRAFT_BIN_DIR", bin_dir)
        .env("GRAFT_QUICKSTART_DIR", &work)
        .output()
        .expect("bash runs the quick start");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "quickstart.sh failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("hot-loaded adapter 'colours'"), "{stdout}");
    for (colour, animal) in [
        ("red", "fox"),
        ("blue", "owl"),
        ("green", "frog"),
        ("gold", "bee"),
    ] {
        let row = stdout
            .lines()
            .find(|l| l.starts_with(&format!("Which animal is {colour}?")))
            .unwrap_or_else(|| panic!("no row for {colour}:\n{stdout}"));
        let answer = format!("' The {animal}.'");
        assert!(
            row.trim_end().ends_with(&answer),
            "the adapter answers {answer}: {row}"
        );
        assert_eq!(
            row.matches(&answer).count(),
            1,
            "the base model does not: {row}"
        );
    }
    let _ = std::fs::remove_dir_all(&work);
}
