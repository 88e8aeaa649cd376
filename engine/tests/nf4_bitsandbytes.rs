//! NF4 against bitsandbytes 0.50.2 on CPU: the reference file holds inputs and what
//! `bitsandbytes.functional.quantize_4bit(nf4, blocksize=64, compress_statistics=True)` and
//! `dequantize_4bit` made of them (written by `tests/oracle/nf4_reference.py`).

use graft_engine::quant::{NF4_LEVELS, Nf4Matrix, dynamic_code};
use safetensors::SafeTensors;

const REFERENCE: &[u8] = include_bytes!("data/nf4_bnb_reference.safetensors");

fn f32s(file: &SafeTensors<'_>, name: &str) -> Vec<f32> {
    let view = file.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    view.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn bytes(file: &SafeTensors<'_>, name: &str) -> Vec<u8> {
    file.tensor(name)
        .unwrap_or_else(|e| panic!("{name}: {e}"))
        .data()
        .to_vec()
}

fn shape(file: &SafeTensors<'_>, name: &str) -> (usize, usize) {
    let dims = file.tensor(name).expect("tensor").shape().to_vec();
    (dims[0], dims[1])
}

fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}

#[test]
fn code_books_are_bitsandbytes_to_the_bit() {
    let file = SafeTensors::deserialize(REFERENCE).expect("reference file");
    assert_eq!(bits(dynamic_code()), bits(&f32s(&file, "dynamic_map")));
    assert_eq!(bits(&NF4_LEVELS), bits(&f32s(&file, "nf4_code")));
}

#[test]
fn dequantizing_bitsandbytes_state_gives_its_weights_to_the_bit() {
    let file = SafeTensors::deserialize(REFERENCE).expect("reference file");
    for case in ["rows", "odd"] {
        let key = |k: &str| format!("{case}.{k}");
        let matrix = Nf4Matrix::from_parts(
            shape(&file, &key("input")),
            bytes(&file, &key("packed")),
            bytes(&file, &key("absmax")),
            f32s(&file, &key("nested_absmax")),
            f32s(&file, &key("offset"))[0],
        )
        .expect("bitsandbytes' parts fit");
        assert_eq!(
            bits(&matrix.dequantize()),
            bits(&f32s(&file, &key("dequantized"))),
            "{case}"
        );
    }
}

#[test]
fn quantizing_gives_bitsandbytes_state() {
    let file = SafeTensors::deserialize(REFERENCE).expect("reference file");
    for case in ["rows", "odd"] {
        let key = |k: &str| format!("{case}.{k}");
        let matrix = Nf4Matrix::quantize(&f32s(&file, &key("input")), shape(&file, &key("input")))
            .expect("quantize");
        assert_eq!(
            matrix.packed(),
            bytes(&file, &key("packed")),
            "{case} packed"
        );
        assert_eq!(
            matrix.absmax(),
            bytes(&file, &key("absmax")),
            "{case} absmax"
        );
        assert_eq!(
            bits(matrix.nested_absmax()),
            bits(&f32s(&file, &key("nested_absmax"))),
            "{case} nested absmax"
        );
        // The mean is the one value torch sums in its own order; allow it one ulp.
        let offset = f32s(&file, &key("offset"))[0];
        assert!(
            matrix.offset().to_bits().abs_diff(offset.to_bits()) <= 1,
            "{case}: offset {} vs {offset}",
            matrix.offset()
        );
    }
}
