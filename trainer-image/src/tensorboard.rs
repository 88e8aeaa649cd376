//! TensorBoard event files, so that `tensorboard --logdir <output>/runs` draws the run's loss,
//! evaluation loss, learning rate, gradient norm and throughput.
//!
//! A file is a sequence of TFRecords, each an `Event` protobuf (TensorFlow's `event.proto`):
//! the payload's length (u64, little-endian), the masked CRC-32C of those 8 bytes, the payload,
//! and the payload's masked CRC-32C. The first event names the format (`brain.Event:2`); each
//! optimizer step is then one event whose summary holds that step's scalars. A writer needs a
//! handful of protobuf fields, encoded here by hand.
//!
//! Object stores cannot append, so the events are kept in memory and the whole file is
//! written again at each checkpoint and at the end. Each write only extends the one before,
//! so a TensorBoard that has read part of a file reads on from where it stopped. A file is
//! closed once it passes [`MAX_FILE_BYTES`] and the next events start a new one, which keeps
//! each rewrite and the memory held small however long the run: TensorBoard reads every event
//! file of a directory, in name order, as one run.

/// Where the event files go, under the job's output.
pub const DIRECTORY: &str = "runs";
/// About 7,000 steps of events per file.
const MAX_FILE_BYTES: usize = 1 << 20;
const FILE_PREFIX: &str = "events.out.tfevents.";

#[derive(Debug)]
pub struct EventLog {
    host: String,
    /// The Unix seconds in the current file's name.
    seconds: u64,
    bytes: Vec<u8>,
    unwritten: bool,
    /// Whether this attempt's `SessionLog` START has been recorded.
    started: bool,
}

impl EventLog {
    /// A log whose first file is named for `now` (Unix seconds) and `host`, or for one second
    /// after the newest of an earlier attempt's files (`existing`: names in the directory) when
    /// that one is as new, so that name order is the order the files were written in.
    pub fn new(host: &str, now: f64, existing: &[String]) -> Self {
        let newest = existing.iter().filter_map(|name| file_seconds(name)).max();
        let mut log = Self {
            host: host.to_owned(),
            seconds: 0,
            bytes: Vec::new(),
            unwritten: false,
            started: false,
        };
        log.start_file(now, newest);
        log
    }

    /// The current file's name in [`DIRECTORY`]: `events.out.tfevents.<seconds>.<host>`, as
    /// TensorFlow names them.
    pub fn file_name(&self) -> String {
        format!("{FILE_PREFIX}{:010}.{}", self.seconds, self.host)
    }

    /// Records step `step`'s scalars (tag, value) at `wall_time` (Unix seconds). The attempt's
    /// first step is preceded by a `SessionLog` START at that step: TensorBoard then drops what
    /// an earlier attempt logged from that step on (a retried run trains again the steps after
    /// its last checkpoint).
    pub fn record(&mut self, wall_time: f64, step: u64, scalars: &[(&str, f32)]) {
        if !self.started {
            self.started = true;
            frame(
                &mut self.bytes,
                &event(wall_time, step, &Body::SessionStart),
            );
        }
        frame(
            &mut self.bytes,
            &event(wall_time, step, &Body::Summary(scalars)),
        );
        self.unwritten = true;
    }

    /// The current file, `(name, bytes)`, when it holds events not yet written.
    pub fn unwritten(&self) -> Option<(String, &[u8])> {
        self.unwritten
            .then(|| (self.file_name(), self.bytes.as_slice()))
    }

    /// To be called once the file [`EventLog::unwritten`] gave is written: a full file is
    /// closed and later events go to a new one, named for `now`.
    pub fn written(&mut self, now: f64) {
        self.unwritten = false;
        if self.bytes.len() >= MAX_FILE_BYTES {
            self.start_file(now, Some(self.seconds));
        }
    }

    fn start_file(&mut self, now: f64, newest: Option<u64>) {
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let now_seconds = now as u64;
        self.seconds = newest.map_or(now_seconds, |s| now_seconds.max(s + 1));
        self.bytes.clear();
        frame(
            &mut self.bytes,
            &event(now, 0, &Body::FileVersion("brain.Event:2")),
        );
    }
}

/// The host part of event file names: the pod's name in a cluster.
pub fn hostname() -> String {
    let name = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.trim().is_empty())
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .unwrap_or_default();
    let name: String = name
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    if name.is_empty() {
        "localhost".to_owned()
    } else {
        name
    }
}

/// The seconds in an event file's name.
fn file_seconds(name: &str) -> Option<u64> {
    name.rsplit('/')
        .next()?
        .strip_prefix(FILE_PREFIX)?
        .split('.')
        .next()?
        .parse()
        .ok()
}

enum Body<'a> {
    FileVersion(&'a str),
    SessionStart,
    Summary(&'a [(&'a str, f32)]),
}

// Protobuf wire types.
const FIXED64: u8 = 1;
const LENGTH_DELIMITED: u8 = 2;
const FIXED32: u8 = 5;

/// An `Event`: `wall_time` (double, 1), `step` (int64, 2), and one of `file_version`
/// (string, 3), `summary` (`Summary`, 5) or `session_log` (`SessionLog`, 7).
fn event(wall_time: f64, step: u64, body: &Body) -> Vec<u8> {
    let mut out = Vec::new();
    key(&mut out, 1, FIXED64);
    out.extend(wall_time.to_le_bytes());
    if step != 0 {
        key(&mut out, 2, 0);
        varint(&mut out, step);
    }
    match body {
        Body::FileVersion(version) => field(&mut out, 3, version.as_bytes()),
        // `SessionLog { status: START (1) }`.
        Body::SessionStart => field(&mut out, 7, &[0x08, 0x01]),
        Body::Summary(scalars) => {
            // `Summary { repeated Value value = 1 }`, `Value { tag = 1, simple_value = 2 }`.
            let mut summary = Vec::new();
            for (tag, value) in *scalars {
                let mut entry = Vec::new();
                field(&mut entry, 1, tag.as_bytes());
                key(&mut entry, 2, FIXED32);
                entry.extend(value.to_le_bytes());
                field(&mut summary, 1, &entry);
            }
            field(&mut out, 5, &summary);
        }
    }
    out
}

fn key(out: &mut Vec<u8>, field: u8, wire_type: u8) {
    varint(out, u64::from(field << 3 | wire_type));
}

fn field(out: &mut Vec<u8>, number: u8, bytes: &[u8]) {
    key(out, number, LENGTH_DELIMITED);
    varint(out, bytes.len() as u64);
    out.extend(bytes);
}

fn varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value & 0x7f) as u8 | 0x80);
        value >>= 7;
    }
    out.push((value & 0x7f) as u8);
}

/// Appends `payload` as one TFRecord.
fn frame(out: &mut Vec<u8>, payload: &[u8]) {
    let length = (payload.len() as u64).to_le_bytes();
    out.extend(length);
    out.extend(masked_crc32c(&length).to_le_bytes());
    out.extend(payload);
    out.extend(masked_crc32c(payload).to_le_bytes());
}

/// TFRecord's masked CRC: a CRC of data that holds CRCs is a poor check, so it is rotated
/// and offset.
fn masked_crc32c(bytes: &[u8]) -> u32 {
    crc32c(bytes).rotate_right(15).wrapping_add(0xa282_ead8)
}

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), a byte at a time: event files are
/// small.
fn crc32c(bytes: &[u8]) -> u32 {
    !bytes.iter().fold(!0u32, |crc, &b| {
        CRC32C_TABLE[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8)
    })
}

const CRC32C_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        #[allow(clippy::cast_possible_truncation)]
        let mut crc = i as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

#[cfg(test)]
mod tests {
    use std::fmt::Write;

    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().fold(String::new(), |mut s, b| {
            write!(s, "{b:02x}").expect("writing to a String");
            s
        })
    }

    #[test]
    fn crc32c_matches_the_castagnoli_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn varints_take_seven_bits_a_byte() {
        let encode = |v| {
            let mut out = Vec::new();
            varint(&mut out, v);
            out
        };
        assert_eq!(encode(1), [0x01]);
        assert_eq!(encode(300), [0xac, 0x02]);
        assert_eq!(encode(u64::MAX).len(), 10);
    }

    /// The bytes TensorBoard's own writer makes for the same three events: `event_pb2.Event(
    /// wall_time=1700000000.5, file_version="brain.Event:2")`, then at `wall_time=1700000001.25,
    /// step=300` one with `session_log=SessionLog(status=START)` and one with `summary=Summary(
    /// value=[Value(tag="train/loss", simple_value=1.25), Value(tag="train/learning_rate",
    /// simple_value=0.0002)])`, each serialized and written by
    /// `tensorboard.summary.writer.record_writer.RecordWriter` (tensorboard 2.21.0).
    #[test]
    fn an_attempts_first_step_is_byte_for_byte_what_tensorboards_writer_makes() {
        let mut log = EventLog::new("pod-a", 1_700_000_000.5, &[]);
        assert!(log.unwritten().is_none(), "nothing to write before a step");
        log.record(
            1_700_000_001.25,
            300,
            &[("train/loss", 1.25), ("train/learning_rate", 0.0002)],
        );
        let (name, bytes) = log.unwritten().expect("a step to write");
        assert_eq!(name, "events.out.tfevents.1700000000.pod-a");
        assert_eq!(
            hex(bytes),
            "1800000000000000a37f4b220900002040fc54d9411a0d627261696e2e4576656e743a322b353110\
             100000000000000095fbfe180900005040fc54d94110ac023a0208010333a0473d00000000000000\
             6049f1ec0900005040fc54d94110ac022a2f0a110a0a747261696e2f6c6f7373150000a03f0a1a0a\
             13747261696e2f6c6561726e696e675f726174651517b751390aac9ed4"
        );
    }

    #[test]
    fn each_write_extends_the_last_and_a_full_file_gives_way_to_a_newer_one() {
        let mut log = EventLog::new("pod-a", 1_700_000_000.0, &[]);
        let mut previous: Vec<u8> = Vec::new();
        let mut step = 0;
        while log.bytes.len() < MAX_FILE_BYTES {
            step += 1;
            log.record(1_700_000_000.0, step, &[("train/loss", 1.0)]);
            if step % 1000 == 0 {
                let (_, bytes) = log.unwritten().expect("unwritten steps");
                assert!(bytes.starts_with(&previous));
                previous = bytes.to_vec();
                log.written(1_700_000_000.0);
            }
        }
        let full = log.file_name();
        log.written(1_700_000_000.0);
        // Written within the same second: the new name still sorts after the full one.
        assert_eq!(log.file_name(), "events.out.tfevents.1700000001.pod-a");
        assert!(log.file_name() > full);
        assert!(log.unwritten().is_none());
        log.record(1_700_000_000.0, step + 1, &[("train/loss", 1.0)]);
        let (_, bytes) = log.unwritten().expect("the next step");
        assert!(bytes.len() < 200, "a new file: the header and one step");
    }

    #[test]
    fn a_later_attempts_file_sorts_after_the_earlier_ones() {
        let existing = [
            "events.out.tfevents.1700000005.pod-a".to_owned(),
            "events.out.tfevents.1700000002.pod-b".to_owned(),
            "notes.txt".to_owned(),
        ];
        let log = EventLog::new("pod-c", 1_700_000_003.0, &existing);
        assert_eq!(log.file_name(), "events.out.tfevents.1700000006.pod-c");
        let log = EventLog::new("pod-c", 1_700_000_100.0, &existing);
        assert_eq!(log.file_name(), "events.out.tfevents.1700000100.pod-c");
    }
}
