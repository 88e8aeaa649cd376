//! Text in and out of the model: the tokenizer and chat templates.

pub mod chat;
pub mod gguf_tokenizer;
pub mod tokenizer;
