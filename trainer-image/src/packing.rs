//! Packing (`training.packing`): several examples per row of at most `maxSequenceLength`
//! tokens, so a dataset of mixed lengths trains on real tokens instead of padding. The model
//! keeps each example to itself (positions restart, attention stays inside it: see
//! `Llama::packed_positions`), and [`collate_rows`] never lets a label cross a boundary, so a
//! packed batch has the loss and gradients of the same examples unpacked.
//!
//! Rows are filled best-fit decreasing, as TRL's `bfd` strategy does: examples longest first
//! (ties by dataset order), each into the row it fills most tightly, a new row when none has
//! room. It depends on the lengths alone, so it is the same on every attempt of a run; the
//! epochs shuffle the rows with the seed as they shuffle unpacked examples.

use std::collections::BTreeSet;

use candle_core::{DType, Device, Result, Tensor};

use crate::{backward::Batch, train::Example};

/// Rows of example indices, each row's lengths summing to at most `capacity` (an example
/// longer than that, which the trainer's truncation never leaves, gets a row of its own).
pub fn pack(lengths: &[usize], capacity: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
    let mut rows: Vec<Vec<usize>> = Vec::new();
    // (room left, row): the tightest row with room for `len` is the first at or above it.
    let mut room: BTreeSet<(usize, usize)> = BTreeSet::new();
    for i in order {
        let len = lengths[i];
        if let Some((left, row)) = room.range((len, 0)..).next().copied() {
            room.remove(&(left, row));
            rows[row].push(i);
            room.insert((left - len, row));
        } else {
            rows.push(vec![i]);
            room.insert((capacity.saturating_sub(len), rows.len() - 1));
        }
    }
    rows
}

/// Right-pads rows of examples, each row its examples one after another, into one
/// micro-batch. A row of one example is what unpacked training collates; with several, the
/// batch records their lengths for the model, and each example's first token is not a label
/// (it would be predicted from the previous example's last).
pub fn collate_rows(rows: &[Vec<&Example>], pad_id: u32, device: &Device) -> Result<Batch> {
    let row_len = |row: &Vec<&Example>| row.iter().map(|e| e.ids.len()).sum::<usize>();
    let len = rows.iter().map(row_len).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(rows.len() * len);
    let mut labels = Vec::with_capacity(rows.len() * len);
    let (mut label_tokens, mut tokens) = (0, 0);
    for row in rows {
        for example in row {
            tokens += example.ids.len();
            label_tokens += example.labels.iter().skip(1).filter(|&&l| l).count();
            ids.extend(&example.ids);
            labels.extend(
                example
                    .labels
                    .iter()
                    .enumerate()
                    .map(|(t, &l)| if l && t > 0 { 1f32 } else { 0.0 }),
            );
        }
        let pad = len - row_len(row);
        ids.extend(std::iter::repeat_n(pad_id, pad));
        labels.extend(std::iter::repeat_n(0f32, pad));
    }
    let shape = (rows.len(), len);
    let packed = rows.iter().any(|row| row.len() > 1);
    Ok(Batch {
        ids: Tensor::from_vec(ids, shape, device)?,
        labels: Tensor::from_vec(labels, shape, device)?.to_dtype(DType::F32)?,
        label_tokens,
        tokens,
        lengths: packed.then(|| {
            rows.iter()
                .map(|row| row.iter().map(|e| e.ids.len()).collect())
                .collect()
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_filled_best_fit_longest_first_within_capacity() {
        let lengths = [3, 9, 4, 6, 2, 7, 1, 5];
        let rows = pack(&lengths, 10);
        // 9 → row 0; 7 → row 1; 6 → row 2; 5 → row 3; 4 fills row 2 (room 4); 3 fills
        // row 1 (room 3); 2 → row 3 (room 5: row 0's 1 is too little); 1 fills row 0.
        assert_eq!(rows, [vec![1, 6], vec![5, 0], vec![3, 2], vec![7, 4]]);
        let mut all: Vec<usize> = rows.concat();
        all.sort_unstable();
        assert_eq!(
            all,
            (0..lengths.len()).collect::<Vec<_>>(),
            "every example once"
        );
        assert_eq!(pack(&lengths, 10), rows, "the same every time");
        assert_eq!(
            pack(&[12, 3], 10),
            [vec![0], vec![1]],
            "too long: a row alone"
        );
    }

    #[test]
    fn packed_rows_never_learn_an_examples_first_token_or_padding() -> Result<()> {
        let example = |ids: &[u32], labels: &[bool]| Example {
            ids: ids.to_vec(),
            labels: labels.to_vec(),
        };
        let a = example(&[1, 2, 3], &[true, true, true]);
        let b = example(&[4, 5], &[true, true]);
        let c = example(&[6], &[true]);
        let batch = collate_rows(&[vec![&a, &b], vec![&c]], 0, &Device::Cpu)?;
        assert_eq!(
            batch.ids.to_vec2::<u32>()?,
            [[1, 2, 3, 4, 5], [6, 0, 0, 0, 0]]
        );
        assert_eq!(
            batch.labels.to_vec2::<f32>()?,
            [[0.0, 1.0, 1.0, 0.0, 1.0], [0.0; 5]]
        );
        assert_eq!((batch.label_tokens, batch.tokens), (3, 6));
        assert_eq!(batch.lengths, Some(vec![vec![3, 2], vec![1]]));
        let unpacked = collate_rows(&[vec![&a], vec![&c]], 0, &Device::Cpu)?;
        assert_eq!(unpacked.lengths, None, "one example a row: nothing packed");
        Ok(())
    }
}
