//! A byte-level BPE tokenizer (GPT-2's kind) trained on the corpus with Hugging Face's
//! `tokenizers` crate: no vocabulary file to download, every byte representable.

use anyhow::{anyhow, Context, Result};
use std::path::Path;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, TokenizerBuilder, TokenizerImpl};

type Inner = TokenizerImpl<BPE, NormalizerWrapper, ByteLevel, ByteLevel, ByteLevel>;

/// The end-of-text token, placed between documents (id 0: it is the first special token).
pub const END_OF_TEXT: &str = "<|endoftext|>";

/// A trained byte-level BPE.
pub struct Bpe {
    inner: Inner,
}

impl std::fmt::Debug for Bpe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bpe({} tokens)", self.vocab_size())
    }
}

fn tk(e: tokenizers::Error) -> anyhow::Error {
    anyhow!("{e}")
}

impl Bpe {
    /// Trains a vocabulary of exactly `vocab` tokens (the 256 bytes, the end-of-text token and
    /// merges) on `texts`. Deterministic for the same texts.
    pub fn train(texts: &[&str], vocab: usize) -> Result<Self> {
        anyhow::ensure!(
            vocab > 257,
            "a byte-level BPE needs more than 257 tokens, got {vocab}"
        );
        let mut trainer = BpeTrainerBuilder::new()
            .vocab_size(vocab)
            .min_frequency(2)
            .show_progress(false)
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .special_tokens(vec![AddedToken::from(END_OF_TEXT, true)])
            .build();
        let mut inner: Inner = TokenizerBuilder::new()
            .with_model(BPE::default())
            .with_normalizer(None)
            .with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)))
            .with_post_processor(Some(ByteLevel::default().trim_offsets(false)))
            .with_decoder(Some(ByteLevel::default()))
            .build()
            .map_err(tk)?;
        inner
            .train(&mut trainer, texts.iter().copied())
            .map_err(tk)?;
        let bpe = Bpe { inner };
        anyhow::ensure!(
            bpe.vocab_size() <= vocab,
            "the BPE has {} tokens, more than the {vocab} asked for",
            bpe.vocab_size()
        );
        Ok(bpe)
    }

    /// Tokens in the vocabulary, the end-of-text token included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of the end-of-text token.
    pub fn end_of_text(&self) -> usize {
        self.inner.token_to_id(END_OF_TEXT).unwrap_or(0) as usize
    }

    /// Token ids of `text`.
    pub fn encode(&self, text: &str) -> Result<Vec<usize>> {
        let enc = self.inner.encode(text, false).map_err(tk)?;
        Ok(enc.get_ids().iter().map(|&i| i as usize).collect())
    }

    /// The text of `ids` (ids outside the vocabulary are an error).
    pub fn decode(&self, ids: &[usize]) -> Result<String> {
        let v = self.vocab_size();
        if let Some(bad) = ids.iter().find(|&&i| i >= v) {
            anyhow::bail!("token id {bad} is outside the tokenizer's {v} tokens");
        }
        let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        self.inner.decode(&ids, false).map_err(tk)
    }

    /// Writes the tokenizer as Hugging Face's `tokenizer.json`.
    pub fn save(&self, path: &Path) -> Result<()> {
        self.inner
            .save(path, false)
            .map_err(tk)
            .with_context(|| format!("cannot write {}", path.display()))
    }

    /// The tokenizer as the text of a `tokenizer.json` (what [`save`](Self::save) writes).
    pub fn to_json(&self) -> Result<String> {
        self.inner.to_string(false).map_err(tk)
    }

    /// A tokenizer from the text of a `tokenizer.json`.
    pub fn from_json(json: &str) -> Result<Self> {
        let inner: Inner = json
            .parse()
            .map_err(tk)
            .context("cannot read the tokenizer")?;
        Ok(Bpe { inner })
    }

    /// Reads a `tokenizer.json` written by [`save`](Self::save).
    pub fn load(path: &Path) -> Result<Self> {
        let inner = Inner::from_file(path)
            .map_err(tk)
            .with_context(|| format!("cannot read the tokenizer {}", path.display()))?;
        Ok(Bpe { inner })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trains_encodes_decodes_and_round_trips() -> Result<()> {
        let text = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind \
                    to suffer\n"
            .repeat(20);
        let bpe = Bpe::train(&[&text], 300)?;
        assert!(bpe.vocab_size() <= 300 && bpe.vocab_size() > 257);
        let ids = bpe.encode("To be, or not to be")?;
        assert!(ids.len() < 19, "merges shorten the text: {ids:?}");
        assert_eq!(bpe.decode(&ids)?, "To be, or not to be");
        // Any byte sequence encodes, even one never seen.
        let odd = "Zyxw ünïcödé ✓";
        assert_eq!(bpe.decode(&bpe.encode(odd)?)?, odd);
        let path = std::env::temp_dir().join(format!("na-bpe-{}.json", std::process::id()));
        bpe.save(&path)?;
        let back = Bpe::load(&path)?;
        assert_eq!(back.encode(&text)?, bpe.encode(&text)?);
        std::fs::remove_file(path).ok();
        assert!(bpe.decode(&[100_000]).is_err());
        Ok(())
    }
}
