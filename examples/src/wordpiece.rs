//! A WordPiece tokenizer (BERT's kind) trained on the corpus with Hugging Face's `tokenizers`
//! crate: lower-cased, accents stripped, split on whitespace and punctuation, words cut into
//! the longest known pieces (`##` marks a piece inside a word). No vocabulary file to download.
//!
//! The special tokens come first, so their ids are fixed: `[PAD]` 0, `[UNK]` 1, `[CLS]` 2,
//! `[SEP]` 3, `[MASK]` 4. [`WordPiece::encode`] returns the word pieces only; the caller adds
//! `[CLS]` and `[SEP]` where BERT wants them.

use anyhow::{anyhow, Context, Result};
use std::collections::BTreeMap;
use std::path::Path;
use tokenizers::decoders::wordpiece::WordPiece as WordPieceDecoder;
use tokenizers::models::wordpiece::{WordPiece as WordPieceModel, WordPieceTrainerBuilder};
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, NormalizedString, Normalizer, TokenizerBuilder, TokenizerImpl};

type Inner = TokenizerImpl<
    WordPieceModel,
    BertNormalizer,
    BertPreTokenizer,
    PostProcessorWrapper,
    WordPieceDecoder,
>;

/// The special tokens, in id order.
pub const SPECIAL: [&str; 5] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];
/// Id of `[PAD]`, the filler after a short sequence (masked out of attention).
pub const PAD: usize = 0;
/// Id of `[UNK]`, a character never seen in training.
pub const UNK: usize = 1;
/// Id of `[CLS]`, the first token, whose output the classifier reads.
pub const CLS: usize = 2;
/// Id of `[SEP]`, the end of a segment.
pub const SEP: usize = 3;
/// Id of `[MASK]`, a position whose token the masked-LM must predict.
pub const MASK: usize = 4;
/// Characters kept in the vocabulary; rarer ones become `[UNK]`.
const ALPHABET: usize = 500;

/// A trained WordPiece tokenizer.
pub struct WordPiece {
    inner: Inner,
}

impl std::fmt::Debug for WordPiece {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WordPiece({} tokens)", self.vocab_size())
    }
}

fn tk(e: tokenizers::Error) -> anyhow::Error {
    anyhow!("{e}")
}

impl WordPiece {
    /// Trains a vocabulary of at most `vocab` tokens (the special tokens, the characters and
    /// the most useful pieces) on `texts`. The same texts give the same vocabulary and ids,
    /// in every process: a resumed run and an uninterrupted one must agree.
    pub fn train(texts: &[&str], vocab: usize) -> Result<Self> {
        anyhow::ensure!(
            vocab > 100,
            "a WordPiece vocabulary needs more than 100 tokens, got {vocab}"
        );
        let build = |model: WordPieceModel| -> Result<Inner> {
            TokenizerBuilder::new()
                .with_model(model)
                .with_normalizer(Some(BertNormalizer::new(true, true, Some(true), true)))
                .with_pre_tokenizer(Some(BertPreTokenizer))
                .with_post_processor(None)
                .with_decoder(Some(WordPieceDecoder::default()))
                .build()
                .map_err(tk)
        };
        let mut inner = build(WordPieceModel::default())?;
        // The trainer numbers the in-word pieces `##c` in the order of a randomly seeded hash
        // map, and breaks ties between equally frequent merges by those numbers: two runs got
        // different vocabularies. Fixing the alphabet and listing every `##c` up front, in
        // character order, makes every id (and so every tie) the same.
        let alphabet = Self::alphabet(&inner, texts, ALPHABET)?;
        let mut first: Vec<AddedToken> =
            SPECIAL.iter().map(|s| AddedToken::from(*s, true)).collect();
        first.extend(
            alphabet
                .iter()
                .map(|c| AddedToken::from(format!("##{c}"), true)),
        );
        let mut trainer = WordPieceTrainerBuilder::new()
            .vocab_size(vocab)
            .min_frequency(2)
            .show_progress(false)
            // Rare characters become [UNK] rather than using up the vocabulary; kept ones
            // are exactly `alphabet` (the trainer's own cut breaks ties at random).
            .initial_alphabet(alphabet.iter().copied().collect())
            .limit_alphabet(alphabet.len())
            .special_tokens(first)
            .build();
        inner
            .train(&mut trainer, texts.iter().copied())
            .map_err(tk)?;
        // Training made every `##c` a special token of the tokenizer; they are ordinary
        // pieces, so the tokenizer is built again around the trained model.
        let mut inner = build(inner.get_model().clone())?;
        inner.add_special_tokens(&SPECIAL.map(|s| AddedToken::from(s, true)));
        let wp = WordPiece { inner };
        wp.check(vocab)?;
        Ok(wp)
    }

    /// The `limit` most frequent characters of the normalized `texts` (ties by character), in
    /// character order.
    fn alphabet(inner: &Inner, texts: &[&str], limit: usize) -> Result<Vec<char>> {
        let mut counts: BTreeMap<char, u64> = BTreeMap::new();
        for text in texts {
            let mut n = NormalizedString::from(*text);
            if let Some(norm) = inner.get_normalizer() {
                norm.normalize(&mut n).map_err(tk)?;
            }
            for c in n.get().chars().filter(|c| !c.is_whitespace()) {
                *counts.entry(c).or_default() += 1;
            }
        }
        let mut by_count: Vec<(char, u64)> = counts.into_iter().collect();
        by_count.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        by_count.truncate(limit);
        let mut kept: Vec<char> = by_count.into_iter().map(|(c, _)| c).collect();
        kept.sort_unstable();
        Ok(kept)
    }

    /// The vocabulary fits a model of `vocab` tokens and the special tokens have their ids.
    pub fn check(&self, vocab: usize) -> Result<()> {
        anyhow::ensure!(
            self.vocab_size() <= vocab,
            "the tokenizer has {} tokens, more than the model's {vocab}; train it again for this \
             model",
            self.vocab_size()
        );
        for (id, s) in SPECIAL.iter().enumerate() {
            let got = self.inner.token_to_id(s).map(|i| i as usize);
            anyhow::ensure!(
                got == Some(id),
                "the tokenizer gives {s} the id {got:?}, not {id}; it is not a tokenizer this \
                 program wrote"
            );
        }
        Ok(())
    }

    /// Tokens in the vocabulary, the special tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Word-piece ids of `text`, without `[CLS]` or `[SEP]`.
    pub fn encode(&self, text: &str) -> Result<Vec<usize>> {
        let enc = self.inner.encode(text, false).map_err(tk)?;
        Ok(enc.get_ids().iter().map(|&i| i as usize).collect())
    }

    /// The text of `ids`, special tokens left out, pieces joined into words.
    pub fn decode(&self, ids: &[usize]) -> Result<String> {
        let v = self.vocab_size();
        if let Some(bad) = ids.iter().find(|&&i| i >= v) {
            anyhow::bail!("token id {bad} is outside the tokenizer's {v} tokens");
        }
        let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        self.inner.decode(&ids, true).map_err(tk)
    }

    /// The token of one id (`[MASK]`, `the`, `##ing`), or `None` outside the vocabulary.
    pub fn token(&self, id: usize) -> Option<String> {
        self.inner.id_to_token(id as u32)
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
        Ok(WordPiece { inner })
    }

    /// Reads a `tokenizer.json` written by [`save`](Self::save).
    pub fn load(path: &Path) -> Result<Self> {
        let inner = Inner::from_file(path)
            .map_err(tk)
            .with_context(|| format!("cannot read the tokenizer {}", path.display()))?;
        Ok(WordPiece { inner })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trains_encodes_decodes_and_round_trips() -> Result<()> {
        let text = "The film is a delight. The acting is wonderful, the plot dull.\n\
                    Films like this one are rare; the directing delights.\n"
            .repeat(30);
        let wp = WordPiece::train(&[&text], 200)?;
        assert!(wp.vocab_size() <= 200);
        for (id, s) in SPECIAL.iter().enumerate() {
            assert_eq!(wp.token(id).as_deref(), Some(*s));
        }
        let ids = wp.encode("The FILM is a Délight.")?;
        assert!(ids.iter().all(|&i| i > MASK), "{ids:?}");
        assert_eq!(wp.decode(&ids)?, "the film is a delight.");
        // A character never seen is [UNK], not an error.
        assert!(wp.encode("zebra ✓")?.contains(&UNK));
        let path = std::env::temp_dir().join(format!("na-wp-{}.json", std::process::id()));
        wp.save(&path)?;
        let back = WordPiece::load(&path)?;
        assert_eq!(back.encode(&text)?, wp.encode(&text)?);
        back.check(200)?;
        assert!(back.check(50).is_err());
        std::fs::remove_file(path).ok();
        Ok(())
    }

    #[test]
    fn training_gives_the_same_ids_every_time() -> Result<()> {
        // Many words of equal frequency: merge ties everywhere, which the trainer used to
        // break by hash order (a fresh random seed per map).
        let words: Vec<String> = (0..60)
            .map(|i| {
                let a = (b'a' + (i % 26) as u8) as char;
                let b = (b'a' + ((i * 7 + 3) % 26) as u8) as char;
                let c = (b'a' + ((i * 11 + 5) % 26) as u8) as char;
                format!("{a}{b}{c}{b}{a}")
            })
            .collect();
        let text = (words.join(" ") + "\n").repeat(3);
        let vocab = |wp: &WordPiece| -> Vec<Option<String>> {
            (0..wp.vocab_size()).map(|i| wp.token(i)).collect()
        };
        let first = WordPiece::train(&[&text], 300)?;
        for _ in 0..4 {
            assert_eq!(vocab(&WordPiece::train(&[&text], 300)?), vocab(&first));
        }
        // In-word pieces are ordinary pieces, not special tokens that decoding drops.
        let ids = first.encode(&words[0])?;
        assert_eq!(first.decode(&ids)?, words[0]);
        Ok(())
    }
}
