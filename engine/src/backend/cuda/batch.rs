//! A mixed serving batch's adapters. On a GPU: two launches of our grouped kernel
//! (`lora.cu`) per projection, however many adapters the batch mixes and of whatever ranks.
//! Elsewhere — and as the kernel's CPU twin — through candle's ops: each distinct adapter's
//! rows are gathered, multiplied once, and added back into their rows of the base output.

use candle_core::{Result, Tensor};

use crate::adapters::{SegmentLora, ServingLora};

/// `y + Σ` each segment's adapter applied to its rows of `x` (`[rows, in]` → `[rows, out]`).
pub fn grouped_adapters(x: &Tensor, y: &Tensor, segments: &[SegmentLora<'_>]) -> Result<Tensor> {
    if segments.iter().all(|s| s.lora.is_none()) {
        return Ok(y.clone());
    }
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return x
            .contiguous()?
            .apply_op2_no_bwd(&y.contiguous()?, &kernel::GroupedLora { segments });
    }
    gathered_adapters(x, y, segments)
}

/// The candle-op form: one gather, pair of products and scatter per distinct adapter.
pub fn gathered_adapters(x: &Tensor, y: &Tensor, segments: &[SegmentLora<'_>]) -> Result<Tensor> {
    let mut groups: Vec<(&ServingLora, Vec<u32>)> = Vec::new();
    for segment in segments {
        let Some(lora) = segment.lora else { continue };
        let rows = segment
            .rows
            .clone()
            .map(|r| u32::try_from(r).expect("rows fit u32"));
        match groups.iter_mut().find(|(l, _)| std::ptr::eq(*l, lora)) {
            Some((_, group)) => group.extend(rows),
            None => groups.push((lora, rows.collect())),
        }
    }
    let mut y = y.clone();
    for (lora, rows) in groups {
        let index = Tensor::new(rows.as_slice(), x.device())?;
        let delta = lora.delta(&x.index_select(&index, 0)?)?;
        y = y.index_add(&index, &delta.to_dtype(y.dtype())?, 0)?;
    }
    Ok(y)
}

#[cfg(feature = "cuda")]
mod kernel {
    use candle_core::{
        CpuStorage, CudaStorage, CustomOp2, Layout, Result, Shape, Storage, backend::BackendStorage,
    };

    use crate::{
        adapters::SegmentLora,
        backend::cuda::kernels::{LoraRows, grouped_lora},
    };

    pub struct GroupedLora<'a> {
        pub segments: &'a [SegmentLora<'a>],
    }

    impl CustomOp2 for GroupedLora<'_> {
        fn name(&self) -> &'static str {
            "grouped-lora"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            candle_core::bail!(
                "grouped-lora: the kernel runs on a GPU; the CPU takes the candle ops"
            )
        }

        fn cuda_fwd(
            &self,
            x: &CudaStorage,
            x_layout: &Layout,
            y: &CudaStorage,
            y_layout: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let (&[rows, input], &[y_rows, out]) = (x_layout.dims(), y_layout.dims()) else {
                candle_core::bail!("grouped-lora: needs x [rows, in] and y [rows, out]");
            };
            if y_rows != rows {
                candle_core::bail!("grouped-lora: x has {rows} rows, y {y_rows}");
            }
            let adapted: Vec<_> = self
                .segments
                .iter()
                .filter_map(|s| s.lora.map(|lora| (s, lora)))
                .collect();
            let guards: Vec<_> = adapted
                .iter()
                .map(|(_, lora)| (lora.a.storage_and_layout(), lora.b_t.storage_and_layout()))
                .collect();
            let mut pairs = Vec::with_capacity(adapted.len());
            for ((segment, lora), ((a, a_layout), (b_t, b_layout))) in adapted.iter().zip(&guards) {
                let (Storage::Cuda(a), Storage::Cuda(b_t)) = (&**a, &**b_t) else {
                    candle_core::bail!("grouped-lora: an adapter is not on the GPU");
                };
                #[allow(clippy::cast_possible_truncation)]
                pairs.push(LoraRows {
                    rows: (segment.rows.start, segment.rows.end),
                    a: (a, a_layout),
                    b_t: (b_t, b_layout),
                    rank: a_layout.dims().first().copied().unwrap_or(0),
                    scale: lora.scale as f32,
                });
            }
            let out_storage = grouped_lora(
                (x, x_layout),
                (y, y_layout),
                (rows, input, out),
                &pairs,
                x.dtype(),
            )?;
            Ok((out_storage, Shape::from((rows, out))))
        }
    }
}
