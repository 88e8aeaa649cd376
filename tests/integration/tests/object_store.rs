//! The engine's object-store access against a real S3-protocol server: path-style requests
//! to a custom endpoint, signed with the credentials the operator injects.

use bytes::Bytes;
use futures::TryStreamExt;
use graft_engine::storage::{self, ObjectUri};
use graft_testenv::S3Server;
use object_store::{ObjectStoreExt, PutPayload};

#[tokio::test]
async fn object_written_to_s3_reads_back_and_lists_under_its_prefix() {
    let s3 = S3Server::shared().await;
    let bucket = s3.bucket("adapters");
    let uri: ObjectUri = format!("s3://{bucket}/support-bot/v3/")
        .parse()
        .expect("uri");
    let location = storage::open(&uri, &s3.options()).expect("open");

    let body = Bytes::from_static(br#"{"r": 16, "lora_alpha": 32}"#);
    let path = location.child("adapter_config.json");
    location
        .store
        .put(&path, PutPayload::from(body.clone()))
        .await
        .expect("put");

    let read = location
        .store
        .get(&path)
        .await
        .expect("get")
        .bytes()
        .await
        .expect("body");
    assert_eq!(read, body);

    let listed: Vec<_> = location
        .store
        .list(Some(&location.prefix))
        .try_collect()
        .await
        .expect("list");
    let names: Vec<_> = listed.iter().map(|m| m.location.to_string()).collect();
    assert_eq!(names, ["support-bot/v3/adapter_config.json"]);
    assert_eq!(listed[0].size, body.len() as u64);
}

#[tokio::test]
async fn wrong_secret_key_is_refused_by_the_server() {
    let s3 = S3Server::shared().await;
    let bucket = s3.bucket("private");
    let uri: ObjectUri = format!("s3://{bucket}/x").parse().expect("uri");
    let mut wrong = s3.options();
    wrong.secret_access_key = Some("not-the-secret".into());
    let location = storage::open(&uri, &wrong).expect("open");
    let err = location
        .store
        .put(&location.child("f"), PutPayload::from_static(b"data"))
        .await
        .expect_err("a request signed with the wrong key must fail");
    let text = err.to_string();
    assert!(
        text.contains("403") || text.contains("SignatureDoesNotMatch"),
        "{text}"
    );
}

#[tokio::test]
async fn missing_object_is_not_found() {
    let s3 = S3Server::shared().await;
    let bucket = s3.bucket("empty");
    let uri: ObjectUri = format!("s3://{bucket}/").parse().expect("uri");
    let location = storage::open(&uri, &s3.options()).expect("open");
    let err = location
        .store
        .get(&location.child("graft.json"))
        .await
        .expect_err("nothing was written");
    assert!(matches!(err, object_store::Error::NotFound { .. }), "{err}");
}
