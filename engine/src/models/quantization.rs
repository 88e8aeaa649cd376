//! `quantization_config` in `config.json`: read, never ignored. A checkpoint quantized by
//! bitsandbytes to 4-bit NF4 with double-quantized scales (the `*-bnb-4bit` checkpoints) is
//! loaded as stored into Graft's NF4 layout, which is bitsandbytes'; every other method is
//! refused with a reason naming it, since reading its packed integers as plain weights would
//! serve garbage.

/// A pre-quantized checkpoint Graft reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prequantized {
    /// bitsandbytes `load_in_4bit`, `nf4`, double quantization: each quantized projection
    /// carries `weight` (packed), `weight.absmax`, `weight.nested_absmax`, the two code maps and
    /// `weight.quant_state.bitsandbytes__nf4`.
    BitsAndBytesNf4,
}

#[derive(Debug, thiserror::Error)]
pub enum QuantizationError {
    #[error(
        "config.json: quantization_config: {method} checkpoints are not supported ({reason}); \
         Graft reads unquantized (f32/f16/bf16) weights, GGUF files and bitsandbytes 4-bit NF4 \
         checkpoints with double quantization"
    )]
    Unsupported { method: String, reason: String },
    #[error("config.json: quantization_config: {0}")]
    Invalid(String),
}

/// What the checkpoint's `quantization_config` (if any) means for loading it.
pub fn check(
    config: Option<&serde_json::Value>,
) -> Result<Option<Prequantized>, QuantizationError> {
    let Some(config) = config.filter(|c| !c.is_null()) else {
        return Ok(None);
    };
    let field = |name: &str| config.get(name);
    let flag = |name: &str| {
        field(name)
            .and_then(serde_json::Value::as_bool)
            .unwrap_or(false)
    };
    let method = field("quant_method")
        .and_then(serde_json::Value::as_str)
        .ok_or_else(|| QuantizationError::Invalid("no quant_method".to_owned()))?;
    let refuse = |method: &str, reason: &str| QuantizationError::Unsupported {
        method: method.to_owned(),
        reason: reason.to_owned(),
    };
    match method {
        "bitsandbytes" => {
            if flag("load_in_8bit") {
                return Err(refuse(
                    "bitsandbytes 8-bit (LLM.int8)",
                    "load_in_8bit: true",
                ));
            }
            if !flag("load_in_4bit") {
                return Err(QuantizationError::Invalid(
                    "bitsandbytes without load_in_4bit or load_in_8bit".to_owned(),
                ));
            }
            let kind = field("bnb_4bit_quant_type")
                .and_then(serde_json::Value::as_str)
                .unwrap_or("fp4");
            if kind != "nf4" {
                return Err(refuse(
                    &format!("bitsandbytes 4-bit {kind}"),
                    "bnb_4bit_quant_type is not nf4",
                ));
            }
            if !flag("bnb_4bit_use_double_quant") {
                return Err(refuse(
                    "bitsandbytes 4-bit nf4 without double quantization",
                    "bnb_4bit_use_double_quant: false stores f32 block scales, Graft's NF4 \
                     layout double-quantizes them",
                ));
            }
            Ok(Some(Prequantized::BitsAndBytesNf4))
        }
        "gguf" => Err(refuse(
            "gguf",
            "give the .gguf file itself as the model URI",
        )),
        other => Err(refuse(other, "quant_method is not bitsandbytes")),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn bitsandbytes_nf4_with_double_quantization_is_read() {
        let config = json!({"quant_method": "bitsandbytes", "load_in_4bit": true,
            "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": true,
            "bnb_4bit_compute_dtype": "bfloat16", "llm_int8_skip_modules": ["lm_head"]});
        assert_eq!(
            check(Some(&config)).expect("supported"),
            Some(Prequantized::BitsAndBytesNf4)
        );
        assert_eq!(check(None).expect("none"), None);
        assert_eq!(check(Some(&serde_json::Value::Null)).expect("null"), None);
    }

    #[test]
    fn other_methods_are_refused_by_name() {
        let cases = [
            (
                json!({"quant_method": "gptq", "bits": 4}),
                "gptq checkpoints",
            ),
            (json!({"quant_method": "awq", "bits": 4}), "awq checkpoints"),
            (
                json!({"quant_method": "fp8", "activation_scheme": "dynamic"}),
                "fp8 checkpoints",
            ),
            (
                json!({"quant_method": "compressed-tensors"}),
                "compressed-tensors checkpoints",
            ),
            (
                json!({"quant_method": "bitsandbytes", "load_in_8bit": true}),
                "bitsandbytes 8-bit",
            ),
            (
                json!({"quant_method": "bitsandbytes", "load_in_4bit": true, "bnb_4bit_quant_type": "fp4",
                    "bnb_4bit_use_double_quant": true}),
                "bitsandbytes 4-bit fp4",
            ),
            (
                json!({"quant_method": "bitsandbytes", "load_in_4bit": true, "bnb_4bit_quant_type": "nf4"}),
                "without double quantization",
            ),
        ];
        for (config, named) in cases {
            let error = check(Some(&config)).expect_err("refused").to_string();
            assert!(error.contains(named), "{error}");
            assert!(!error.contains('\n'), "one line: {error}");
        }
    }
}
