//! (IA)³ adapters through a running `graft-server`: hot-loaded with the admin API like LoRA
//! adapters, served in the same batches as LoRA and base requests (each answer what it is
//! alone), and refused with the reason when they do not fit the model.

mod common;

use common::{BASE, Server, random_adapter, random_ia3, store_peft as store, text};
use graft_engine::adapters::{PeftAdapter, Site};
use graft_testenv::S3Server;

#[tokio::test]
async fn ia3_adapters_hot_load_and_share_batches_with_lora_and_the_base() {
    let s3 = S3Server::shared().await;
    let bucket = s3.bucket("ia3");
    let server = Server::start(&["--max-batch-size", "8"]).await;
    let ia3 = store(s3, &bucket, "ia3", &PeftAdapter::Ia3(random_ia3(3))).await;
    let lora = random_adapter(4, 1, &[Site::QProj, Site::VProj]);
    let lora = store(s3, &bucket, "lora", &PeftAdapter::Lora(lora)).await;
    for (name, adapter) in [("scaled", &ia3), ("lora", &lora)] {
        let (status, body) = server.put_adapter(name, &[(adapter, 100)]).await;
        assert_eq!(status, 200, "{name}: {body}");
    }

    let prompt = "colour red";
    let mut alone = Vec::new();
    for model in ["scaled", "lora", BASE] {
        alone.push(text(&server.complete(model, prompt, 12).await).to_owned());
    }
    assert_ne!(alone[0], alone[2], "the (IA)³ adapter changes the answer");
    assert_ne!(alone[0], alone[1], "and differs from the LoRA's");
    // The three at once, twice over: they decode in the same steps.
    let together = futures::future::join_all(
        ["scaled", "lora", BASE, "scaled", "lora", BASE]
            .map(|model| server.complete(model, prompt, 12)),
    )
    .await;
    for (i, body) in together.iter().enumerate() {
        assert_eq!(text(body), alone[i % 3], "request {i} in a mixed batch");
    }

    // A vector one entry short: refused with the reason, and the adapter keeps serving.
    let mut short = random_ia3(4);
    let k = short.vectors.get_mut(&(0, Site::KProj)).expect("k_proj");
    let len = k.vector.elem_count();
    k.vector = k.vector.narrow(0, 0, len - 1).expect("shorter");
    let short = store(s3, &bucket, "short", &PeftAdapter::Ia3(short)).await;
    let (status, body) = server.put_adapter("scaled", &[(&short, 100)]).await;
    assert_eq!(status, 422, "{body}");
    let message = body["error"]["message"].as_str().expect("message");
    assert!(
        message.contains(&format!("k_proj of layer 0 has {}", len - 1)),
        "{message}"
    );
    assert_eq!(text(&server.complete("scaled", prompt, 12).await), alone[0]);
}
