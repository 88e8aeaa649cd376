//! The README's local quick start, run as a user runs it: on the real model (SmolLM2, with
//! the release binaries `quickstart.sh` builds, as a user's first run does), the adapter answers
//! in the trained voice and the base model does not; with `--tiny` (the binaries this test run
//! built), the adapter answers the trained questions exactly and the base model does not.

use std::process::Command;

use graft_testenv::{repo_root, workspace_binary};

#[test]
fn the_quick_start_fine_tunes_smollm2_and_the_adapter_answers_in_the_trained_voice() {
    let work = std::env::temp_dir().join(format!("graft-quickstart-real-{}", std::process::id()));
    let started = std::time::Instant::now();
    let output = Command::new("bash")
        .arg(repo_root().join("quickstart.sh"))
        .env("GRAFT_QUICKSTART_DIR", &work)
        .env_remove("GRAFT_BIN_DIR")
        .output()
        .expect("bash runs the quick start");
    let stdout = String::from_utf8_lossy(&output.stdout);
    // The run's output, stage timings included, for the CI log.
    eprintln!("{stdout}");
    eprintln!("quickstart.sh took {:.0?} in all", started.elapsed());
    assert!(
        output.status.success(),
        "quickstart.sh failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("hot-loaded adapter 'pirate'"), "{stdout}");
    for stage in [
        "fetch the model:",
        "train the adapter:",
        "serve, hot-load and answer:",
    ] {
        assert!(
            stdout.contains(stage),
            "the wall time of '{stage}': {stdout}"
        );
    }
    let answers = |prefix: &str| -> Vec<String> {
        stdout
            .lines()
            .filter_map(|l| l.trim_start().strip_prefix(prefix))
            .map(|a| a.trim().to_owned())
            .collect()
    };
    let (base, adapted) = (answers("base SmolLM2:"), answers("adapter pirate:"));
    assert_eq!(base.len(), 4, "four questions: {stdout}");
    assert_eq!(adapted.len(), 4, "four questions: {stdout}");
    for (base, adapted) in base.iter().zip(&adapted) {
        // The trained voice: every answer in the dataset opens "Arr, matey!".
        assert!(
            adapted.starts_with("Arr"),
            "the adapter answers as trained: {adapted:?}"
        );
        assert!(
            !base.contains("Arr") && !base.is_empty(),
            "the base model answers in its own voice: {base:?}"
        );
    }
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn the_tiny_quick_start_trains_serves_and_shows_the_adapter_answering() {
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
