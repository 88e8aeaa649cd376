//! `crds/` and the chart's `files/crds.yaml` must hold exactly what `graft-operator crd` prints, so the
//! schema users install is the schema the code validates against.

#[test]
fn committed_crds_match_the_api_types() {
    let expected = graft_api::crds_yaml().expect("serialising the CRDs");
    let root = graft_testenv::repo_root();
    for file in ["crds/graft.yaml", "charts/graft/files/crds.yaml"] {
        let committed = std::fs::read_to_string(root.join(file)).unwrap_or_default();
        assert!(
            committed == expected,
            "{file} is stale: regenerate it with `cargo run -p graft-operator -- crd > {file}`"
        );
    }
}

#[test]
fn committed_api_reference_matches_the_api_types() {
    let file = "docs/reference/api.md";
    let committed =
        std::fs::read_to_string(graft_testenv::repo_root().join(file)).unwrap_or_default();
    assert!(
        committed == graft_api::api_reference(),
        "{file} is stale: regenerate it with `cargo run -p graft-operator -- docs > {file}`"
    );
}
