//! Gradients reach every adapter through the whole model (no fused op cuts them), and they are
//! the true derivatives: the analytic gradient of one B entry equals a finite difference.

mod common;

use candle_core::{Device, Result, Tensor, Var};
use graft_engine::{
    adapters::{Lora, Site},
    models::{Llama, Precision},
    rng::Rng,
};

fn model(precision: Precision) -> Llama {
    common::model("llama", precision)
}

/// Puts a LoRA with random A and B (B non-zero, so A gets a gradient too) on every site.
fn attach(model: &mut Llama) -> Result<Vec<(Site, Var, Var)>> {
    let mut rng = Rng::seed(3);
    let mut vars = Vec::new();
    for layer in 0..model.config().num_layers {
        for &site in model.sites() {
            let shape = model.site_shape(site).expect("a site of the model");
            let fresh = Lora::init(4, shape, 2.0, &mut rng, &Device::Cpu)?;
            let b: Vec<f32> = (0..shape.0 * 4).map(|_| rng.uniform(-0.1, 0.1)).collect();
            let a = Var::from_tensor(&fresh.a)?;
            let b = Var::from_tensor(&Tensor::from_vec(b, (shape.0, 4), &Device::Cpu)?)?;
            let lora = Lora {
                a: a.as_tensor().clone(),
                b: b.as_tensor().clone(),
                scale: 2.0,
                magnitude: None,
            };
            model.set_lora(layer, site, Some(lora));
            vars.push((site, a, b));
        }
    }
    Ok(vars)
}

fn loss(model: &Llama) -> Result<Tensor> {
    let ids = Tensor::new(&[[3u32, 14, 15, 92, 65, 35]], &Device::Cpu)?;
    let logits = model.forward(&ids)?;
    // Any scalar that depends on every position will do.
    (logits.sqr()?.mean_all()? * 0.01)?.sum_all()
}

#[test]
fn every_adapter_gets_a_gradient_through_dense_and_nf4_models() -> Result<()> {
    for precision in [Precision::Dense, Precision::Nf4] {
        let mut model = model(precision);
        let vars = attach(&mut model)?;
        let grads = loss(&model)?.backward()?;
        for (site, a, b) in &vars {
            for (name, var) in [("A", a), ("B", b)] {
                let grad = grads
                    .get(var.as_tensor())
                    .unwrap_or_else(|| panic!("{precision:?} {site:?} {name}: no gradient"));
                let norm: f32 = grad.sqr()?.sum_all()?.to_scalar()?;
                assert!(norm > 0.0, "{precision:?} {site:?} {name}: zero gradient");
            }
        }
    }
    Ok(())
}

/// Central differences agree with the backward pass: on Llama's `v_proj`, and on Phi-3's
/// fused `qkv_proj` at a query row that rotates (0) and one that passes through unrotated (14:
/// Phi-4-mini's partial rotary leaves 12 of 16 dimensions rotating).
#[test]
fn the_gradient_is_the_derivative() -> Result<()> {
    for (name, site, row) in [
        ("llama", Site::VProj, 0),
        ("phi3", Site::QkvProj, 0),
        ("phi3", Site::QkvProj, 14),
    ] {
        let mut model = common::model(name, Precision::Dense);
        let vars = attach(&mut model)?;
        let grads = loss(&model)?.backward()?;
        // The first layer's B on `site`, entry [row, 0].
        let (_, _, b) = vars.iter().find(|(s, _, _)| *s == site).expect("the site");
        let analytic: f32 = grads
            .get(b.as_tensor())
            .expect("grad")
            .get(row)?
            .get(0)?
            .to_scalar()?;

        let step = 1e-2f32;
        let original = b.as_tensor().to_vec2::<f32>()?;
        let at = |delta: f32| -> Result<f32> {
            let mut values = original.clone();
            values[row][0] += delta;
            b.set(&Tensor::new(values, &Device::Cpu)?)?;
            loss(&model)?.to_scalar::<f32>()
        };
        let numeric = (at(step)? - at(-step)?) / (2.0 * step);
        assert!(
            analytic.abs() > 1e-5,
            "{name} {site:?}[{row}]: a gradient worth checking: {analytic}"
        );
        assert!(
            (analytic - numeric).abs() <= 1e-2 * analytic.abs().max(1e-3),
            "{name} {site:?}[{row}]: analytic {analytic} vs finite difference {numeric}"
        );
    }
    Ok(())
}
