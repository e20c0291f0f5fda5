//! Image–caption pairs for `train-clip`: procedurally generated captioned scenes, the Twemoji
//! images with their names, and a word-level tokenizer for CLIP's text tower.
//!
//! # Scenes
//!
//! A [`Scene`] is one or two [`Object`]s on a black 32×32 canvas; each object is a shape
//! ([`SHAPES`]) × a colour ([`COLOURS`]) × a size (small, large) × a position (left, right,
//! top, bottom, centre), rasterised here with 2×2 supersampling, and described by a caption
//! such as "a large red circle on the left" or "a small blue square at the top and a green
//! triangle at the bottom". Everything is a pure function of a seed ([`Scene::random`]).
//!
//! The shape–colour pairs of [`HELD_OUT`] never appear in training scenes; the evaluation
//! scenes each hold at least one of them, so retrieval and zero-shot accuracy on them test
//! whether the model composes a colour and a shape it has only seen apart. Training captions
//! sometimes leave out the size, the position, the colour or the shape ("a red object", "a
//! circle on the left"), so that the short prompts of zero-shot classification are captions of
//! the kind the model was trained on; evaluation captions are always complete.
//!
//! # Emoji
//!
//! `python3 tools/fetch_data.py emoji` fetches npm `emoji-datasource-twitter` (Twemoji, CC-BY
//! 4.0): `emoji.json` (a list of objects with `name` and `image`) and `64/<image>` (64×64
//! PNGs). [`load_emoji`] reads them, composites each image on a grey background
//! ([`EMOJI_BACKGROUND`]), averages it down to 32×32 and captions it with its lower-cased name
//! ("grinning face"). A tenth of the emoji, chosen by a hash of the name, are held out.
//!
//! # Tokens
//!
//! [`Vocab`] numbers the words of the training captions in order of first appearance from 2
//! on; 0 is padding ([`PAD`]), 1 an unknown word ([`UNK`]) and [`EOS`] = 7999 the end-of-text
//! token that `ClipTiny`'s text tower reads its embedding at. A caption becomes at most
//! [`CONTEXT`]` - 1` word ids, the end-of-text token, then padding.

use anyhow::{bail, ensure, Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::path::Path;

/// Side of the images (`ClipTiny` takes `[N, 3, 32, 32]`).
pub const SIDE: usize = 32;
/// Values of one image, `[3, SIDE, SIDE]`.
pub const PIXELS: usize = 3 * SIDE * SIDE;
/// Positions of `ClipTiny`'s text tower (its `P`): captions are cut to this many tokens.
pub const CONTEXT: usize = 32;
/// `ClipTiny`'s end-of-text id: the text embedding is read at its first occurrence.
pub const EOS: usize = 7999;
/// The padding id, after the end-of-text token.
pub const PAD: usize = 0;
/// The id of a word the vocabulary does not hold.
pub const UNK: usize = 1;
/// The first word id.
pub const FIRST_WORD: usize = 2;

/// The shapes of scene objects.
pub const SHAPES: [&str; 6] = ["circle", "square", "triangle", "cross", "diamond", "ring"];
/// The colour names of scene objects, with [`RGB`] in the same order.
pub const COLOURS: [&str; 8] = [
    "red", "green", "blue", "yellow", "purple", "orange", "white", "cyan",
];
/// The colours of [`COLOURS`], as RGB bytes.
pub const RGB: [[u8; 3]; 8] = [
    [230, 40, 40],
    [40, 200, 60],
    [50, 80, 240],
    [240, 230, 50],
    [150, 60, 200],
    [250, 140, 30],
    [245, 245, 245],
    [40, 220, 230],
];
/// The sizes, small then large.
pub const SIZES: [&str; 2] = ["small", "large"];
/// Radius in pixels of a small and a large object.
const RADII: [f32; 2] = [4.5, 7.5];
/// The positions, as caption phrases.
pub const POSITIONS: [&str; 5] = [
    "on the left",
    "on the right",
    "at the top",
    "at the bottom",
    "in the centre",
];
/// Centre `(x, y)` of each position, in pixels.
const CENTRES: [(f32, f32); 5] = [
    (8.0, 16.0),
    (24.0, 16.0),
    (16.0, 8.0),
    (16.0, 24.0),
    (16.0, 16.0),
];

/// `(shape, colour)` index pairs that training scenes never show: each shape and each colour
/// appear in training with other partners, but these combinations only in evaluation.
pub const HELD_OUT: [(usize, usize); 8] = [
    (0, 2), // blue circle
    (1, 3), // yellow square
    (2, 4), // purple triangle
    (3, 0), // red cross
    (4, 7), // cyan diamond
    (5, 1), // green ring
    (0, 5), // orange circle
    (2, 6), // white triangle
];

/// Whether the shape–colour pair is one of [`HELD_OUT`].
pub fn held_out(shape: usize, colour: usize) -> bool {
    HELD_OUT.contains(&(shape, colour))
}

/// One object of a scene, by indices into [`SHAPES`], [`COLOURS`], [`SIZES`], [`POSITIONS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Object {
    /// Index into [`SHAPES`].
    pub shape: usize,
    /// Index into [`COLOURS`].
    pub colour: usize,
    /// Index into [`SIZES`].
    pub size: usize,
    /// Index into [`POSITIONS`].
    pub position: usize,
    /// Offset of the centre in pixels (jitter), `-1..=1` in each direction.
    pub offset: (i8, i8),
}

/// Which parts a caption of an object says (training captions leave some out).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mention {
    /// Says the size.
    pub size: bool,
    /// Says the colour.
    pub colour: bool,
    /// Says the shape (otherwise "object").
    pub shape: bool,
    /// Says the position.
    pub position: bool,
}

impl Mention {
    /// Everything.
    pub const FULL: Mention = Mention {
        size: true,
        colour: true,
        shape: true,
        position: true,
    };
}

/// Which combinations a scene draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// Only shape–colour pairs that are not [`HELD_OUT`].
    Train,
    /// At least one object with a [`HELD_OUT`] pair (the other, if any, from every pair).
    HeldOut,
}

/// One or two objects, and what the caption says of each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scene {
    /// The objects; two are at opposite positions (left–right or top–bottom).
    pub objects: Vec<Object>,
    /// What the caption says of each object.
    pub mentions: Vec<Mention>,
}

fn pair(rng: &mut StdRng, split: Split) -> (usize, usize) {
    match split {
        Split::HeldOut => HELD_OUT[rng.gen_range(0..HELD_OUT.len())],
        Split::Train => loop {
            let p = (
                rng.gen_range(0..SHAPES.len()),
                rng.gen_range(0..COLOURS.len()),
            );
            if !held_out(p.0, p.1) {
                return p;
            }
        },
    }
}

impl Scene {
    /// A random scene of `split` with `objects` (1 or 2) objects, from `rng`; with `partial`,
    /// captions sometimes leave out parts (training), otherwise they say everything.
    pub fn random(rng: &mut StdRng, split: Split, objects: usize, partial: bool) -> Scene {
        let positions = if objects >= 2 {
            // Opposite positions, so that two large objects do not overlap.
            let (a, b) = if rng.gen_bool(0.5) { (0, 1) } else { (2, 3) };
            if rng.gen_bool(0.5) {
                vec![a, b]
            } else {
                vec![b, a]
            }
        } else {
            vec![rng.gen_range(0..POSITIONS.len())]
        };
        let held = rng.gen_range(0..positions.len());
        let mut scene = Scene {
            objects: Vec::new(),
            mentions: Vec::new(),
        };
        for (i, &position) in positions.iter().enumerate() {
            let s = if split == Split::HeldOut && i != held {
                // The other object of a held-out scene may be any pair.
                (
                    rng.gen_range(0..SHAPES.len()),
                    rng.gen_range(0..COLOURS.len()),
                )
            } else {
                pair(rng, split)
            };
            scene.objects.push(Object {
                shape: s.0,
                colour: s.1,
                size: rng.gen_range(0..2),
                position,
                offset: (rng.gen_range(-1..=1), rng.gen_range(-1..=1)),
            });
            let mention = if partial {
                let colour = rng.gen_bool(0.75);
                Mention {
                    size: rng.gen_bool(0.8),
                    colour,
                    // Never "an object" with neither colour nor shape.
                    shape: !colour || rng.gen_bool(0.9),
                    position: rng.gen_bool(0.8),
                }
            } else {
                Mention::FULL
            };
            scene.mentions.push(mention);
        }
        scene
    }

    /// The caption: "a large red circle on the left and a blue square on the right".
    pub fn caption(&self) -> String {
        let parts: Vec<String> = self
            .objects
            .iter()
            .zip(&self.mentions)
            .map(|(o, m)| {
                let mut w = vec!["a"];
                if m.size {
                    w.push(SIZES[o.size]);
                }
                if m.colour {
                    w.push(COLOURS[o.colour]);
                }
                w.push(if m.shape { SHAPES[o.shape] } else { "object" });
                if m.position {
                    w.push(POSITIONS[o.position]);
                }
                w.join(" ")
            })
            .collect();
        parts.join(" and ")
    }

    /// The image, `[3, 32, 32]` RGB in `[0, 1]`, objects on black.
    pub fn render(&self) -> Vec<f32> {
        let mut img = vec![0.0f32; PIXELS];
        for o in &self.objects {
            let (cx, cy) = CENTRES[o.position];
            let (cx, cy) = (cx + o.offset.0 as f32, cy + o.offset.1 as f32);
            let r = RADII[o.size];
            let rgb = RGB[o.colour];
            let (x0, x1) = (
                (cx - r - 1.0).max(0.0) as usize,
                ((cx + r + 1.0) as usize).min(SIDE),
            );
            let (y0, y1) = (
                (cy - r - 1.0).max(0.0) as usize,
                ((cy + r + 1.0) as usize).min(SIDE),
            );
            for y in y0..y1 {
                for x in x0..x1 {
                    // Coverage from 2×2 samples: anti-aliased edges.
                    let mut cover = 0.0;
                    for (sx, sy) in [(0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75)] {
                        let u = (x as f32 + sx - cx) / r;
                        let v = (y as f32 + sy - cy) / r;
                        if inside(o.shape, u, v) {
                            cover += 0.25;
                        }
                    }
                    if cover > 0.0 {
                        for (c, &value) in rgb.iter().enumerate() {
                            let p = &mut img[c * SIDE * SIDE + y * SIDE + x];
                            *p = *p * (1.0 - cover) + cover * value as f32 / 255.0;
                        }
                    }
                }
            }
        }
        img
    }
}

/// Whether `(u, v)` (relative to the centre, in radii; `v` down) is inside shape `shape`.
fn inside(shape: usize, u: f32, v: f32) -> bool {
    let d = (u * u + v * v).sqrt();
    match shape {
        0 => d <= 1.0,
        1 => u.abs().max(v.abs()) <= 0.8,
        // Apex up, base down.
        2 => (-0.85..=0.85).contains(&v) && u.abs() <= (v + 0.85) / 1.7,
        3 => (u.abs() <= 0.3 && v.abs() <= 0.95) || (v.abs() <= 0.3 && u.abs() <= 0.95),
        4 => u.abs() + v.abs() <= 1.0,
        _ => (0.55..=1.0).contains(&d),
    }
}

/// The 80 single-object held-out scenes: each [`HELD_OUT`] pair at each size and position,
/// centred, fully captioned (the zero-shot evaluation).
pub fn held_out_singles() -> Vec<Scene> {
    singles(Split::HeldOut)
}

/// 80 single-object scenes, centred and fully captioned: with [`Split::HeldOut`], each
/// [`HELD_OUT`] pair at each size and position; with [`Split::Train`], each of the 40 pairs
/// seen in training at each size, in one position per pair. Zero-shot accuracy on both tells
/// a model that has not learned an attribute from one that cannot compose it anew.
pub fn singles(split: Split) -> Vec<Scene> {
    let single = |shape, colour, size, position| Scene {
        objects: vec![Object {
            shape,
            colour,
            size,
            position,
            offset: (0, 0),
        }],
        mentions: vec![Mention::FULL],
    };
    let mut out = Vec::new();
    match split {
        Split::HeldOut => {
            for &(shape, colour) in &HELD_OUT {
                for size in 0..SIZES.len() {
                    for position in 0..POSITIONS.len() {
                        out.push(single(shape, colour, size, position));
                    }
                }
            }
        }
        Split::Train => {
            for shape in 0..SHAPES.len() {
                for colour in (0..COLOURS.len()).filter(|&c| !HELD_OUT.contains(&(shape, c))) {
                    for size in 0..SIZES.len() {
                        out.push(single(
                            shape,
                            colour,
                            size,
                            (shape + colour) % POSITIONS.len(),
                        ));
                    }
                }
            }
        }
    }
    out
}

pub use crate::order::mix;

/// Image values in `[0, 1]` to the model's input range `[-1, 1]`.
pub fn normalise(img: &mut [f32]) {
    for v in img {
        *v = *v * 2.0 - 1.0;
    }
}

/// Lower-case alphanumeric words of a caption (punctuation separates words and is dropped).
pub fn words(caption: &str) -> impl Iterator<Item = String> + '_ {
    caption
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(|w| w.to_lowercase())
}

/// A word-level vocabulary: word `i` of `words` has id `FIRST_WORD + i`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vocab {
    words: Vec<String>,
    ids: HashMap<String, usize>,
}

impl Vocab {
    /// The words of `captions` in order of first appearance. At most `EOS - FIRST_WORD` words
    /// fit below the end-of-text id.
    pub fn build<'a>(captions: impl IntoIterator<Item = &'a str>) -> Result<Vocab> {
        let mut v = Vocab {
            words: Vec::new(),
            ids: HashMap::new(),
        };
        for c in captions {
            for w in words(c) {
                if !v.ids.contains_key(&w) {
                    v.ids.insert(w.clone(), FIRST_WORD + v.words.len());
                    v.words.push(w);
                }
            }
        }
        ensure!(
            v.words.len() <= EOS - FIRST_WORD,
            "the captions hold {} distinct words, more than the {} ids below the end-of-text \
             token {EOS}",
            v.words.len(),
            EOS - FIRST_WORD
        );
        Ok(v)
    }

    /// Number of words (without the special ids).
    pub fn len(&self) -> usize {
        self.words.len()
    }

    /// Whether it holds no words.
    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    /// The ids of `caption`: at most `len - 1` words ([`UNK`] for unknown ones), [`EOS`], then
    /// [`PAD`] up to `len` (at least 1).
    pub fn encode(&self, caption: &str, len: usize) -> Vec<usize> {
        let len = len.max(1);
        let mut ids: Vec<usize> = words(caption)
            .take(len - 1)
            .map(|w| self.ids.get(&w).copied().unwrap_or(UNK))
            .collect();
        ids.push(EOS);
        ids.resize(len, PAD);
        ids
    }

    /// Tokens of `caption` with the end-of-text token, at most [`CONTEXT`].
    pub fn token_count(caption: &str) -> usize {
        (words(caption).count() + 1).min(CONTEXT)
    }

    /// The words of `ids` up to the end-of-text token (`<unk>` for [`UNK`]).
    pub fn decode(&self, ids: &[usize]) -> String {
        ids.iter()
            .take_while(|&&i| i != EOS)
            .filter(|&&i| i != PAD)
            .map(|&i| {
                self.words
                    .get(i.wrapping_sub(FIRST_WORD))
                    .map_or("<unk>", |w| w.as_str())
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Writes [`to_json`](Self::to_json) to `path`.
    pub fn save(&self, path: &Path, data: &str) -> Result<()> {
        std::fs::write(path, self.to_json(data))
            .with_context(|| format!("cannot write {}", path.display()))
    }

    /// `{"pad", "unk", "eos", "data", "words"}`; `data` records the source.
    pub fn to_json(&self, data: &str) -> String {
        let json = serde_json::json!({
            "pad": PAD, "unk": UNK, "eos": EOS, "data": data, "words": self.words,
        });
        format!("{json:#}\n")
    }

    /// Reads what [`save`](Self::save) wrote: the vocabulary and the data source.
    pub fn load(path: &Path) -> Result<(Vocab, String)> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the vocabulary {}", path.display()))?;
        Self::from_json(&text, path)
    }

    /// Parses what [`to_json`](Self::to_json) wrote; errors name `path`, where it came from.
    pub fn from_json(text: &str, path: &Path) -> Result<(Vocab, String)> {
        let v: serde_json::Value = serde_json::from_str(text).with_context(|| {
            format!(
                "{} is not valid JSON; the run directory is damaged",
                path.display()
            )
        })?;
        ensure!(
            v["eos"].as_u64() == Some(EOS as u64)
                && v["pad"].as_u64() == Some(PAD as u64)
                && v["unk"].as_u64() == Some(UNK as u64),
            "{}: special ids other than pad {PAD}, unk {UNK}, eos {EOS}",
            path.display()
        );
        let Some(list) = v["words"].as_array() else {
            bail!("{}: no `words` list", path.display());
        };
        let mut vocab = Vocab {
            words: Vec::new(),
            ids: HashMap::new(),
        };
        for (i, w) in list.iter().enumerate() {
            let Some(w) = w.as_str() else {
                bail!("{}: word {i} is not a string", path.display());
            };
            ensure!(
                vocab.ids.insert(w.to_string(), FIRST_WORD + i).is_none(),
                "{}: the word `{w}` appears twice",
                path.display()
            );
            vocab.words.push(w.to_string());
        }
        ensure!(
            vocab.words.len() <= EOS - FIRST_WORD,
            "{}: too many words",
            path.display()
        );
        let data = v["data"].as_str().unwrap_or("scenes").to_string();
        Ok((vocab, data))
    }
}

/// Every word a scene caption can hold, in a fixed order (the scene part of the vocabulary).
pub fn scene_words() -> String {
    let mut all = vec!["a", "and", "object"];
    all.extend(SIZES);
    all.extend(COLOURS);
    all.extend(SHAPES);
    all.extend(POSITIONS);
    all.join(" ")
}

/// Background the transparent emoji pixels are composited on (mid grey, RGB in `[0, 1]`).
pub const EMOJI_BACKGROUND: [f32; 3] = [0.5, 0.5, 0.5];

/// One emoji: its name as a caption and its 32×32 image.
#[derive(Debug, Clone, PartialEq)]
pub struct Emoji {
    /// The lower-cased name ("grinning face").
    pub caption: String,
    /// `[3, 32, 32]` RGB in `[0, 1]`.
    pub pixels: Vec<f32>,
}

const REFETCH: &str = "fetch it again with\n    python3 tools/fetch_data.py emoji --force";

/// Decodes a PNG (any colour type, 8 or 16 bits) to RGBA bytes, returning `(width, height,
/// rgba)`.
pub fn decode_png(bytes: &[u8], name: &str) -> Result<(usize, usize, Vec<u8>)> {
    let mut dec = png::Decoder::new(bytes);
    // Palette and low bit depths to 8-bit channels, tRNS to alpha, 16 bits to 8.
    dec.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = dec
        .read_info()
        .with_context(|| format!("{name} is not a readable PNG; {REFETCH}"))?;
    let mut buf = vec![0u8; reader.output_buffer_size()];
    let info = reader
        .next_frame(&mut buf)
        .with_context(|| format!("{name}: damaged PNG data; {REFETCH}"))?;
    let (w, h) = (info.width as usize, info.height as usize);
    let channels = match info.color_type {
        png::ColorType::Grayscale => 1,
        png::ColorType::GrayscaleAlpha => 2,
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        png::ColorType::Indexed => bail!("{name}: palette left unexpanded"),
    };
    ensure!(
        w > 0 && h > 0 && buf.len() >= w * h * channels,
        "{name}: empty or short PNG; {REFETCH}"
    );
    let mut rgba = Vec::with_capacity(w * h * 4);
    for px in buf[..w * h * channels].chunks_exact(channels) {
        let p = match channels {
            1 => [px[0], px[0], px[0], 255],
            2 => [px[0], px[0], px[0], px[1]],
            3 => [px[0], px[1], px[2], 255],
            _ => [px[0], px[1], px[2], px[3]],
        };
        rgba.extend_from_slice(&p);
    }
    Ok((w, h, rgba))
}

/// RGBA bytes (`w × h`) composited on [`EMOJI_BACKGROUND`] and averaged down (area) to the
/// `[3, 32, 32]` input, in `[0, 1]`.
pub fn to_input(w: usize, h: usize, rgba: &[u8]) -> Vec<f32> {
    let mut out = vec![0.0f32; PIXELS];
    for oy in 0..SIDE {
        for ox in 0..SIDE {
            let (ya, yb) = (oy * h / SIDE, ((oy + 1) * h / SIDE).max(oy * h / SIDE + 1));
            let (xa, xb) = (ox * w / SIDE, ((ox + 1) * w / SIDE).max(ox * w / SIDE + 1));
            let mut acc = [0.0f32; 3];
            let mut n = 0.0;
            for y in ya..yb.min(h) {
                for x in xa..xb.min(w) {
                    let p = &rgba[(y * w + x) * 4..(y * w + x) * 4 + 4];
                    let a = p[3] as f32 / 255.0;
                    for c in 0..3 {
                        acc[c] += a * p[c] as f32 / 255.0 + (1.0 - a) * EMOJI_BACKGROUND[c];
                    }
                    n += 1.0;
                }
            }
            for c in 0..3 {
                out[c * SIDE * SIDE + oy * SIDE + ox] = acc[c] / f32::max(n, 1.0);
            }
        }
    }
    out
}

/// FNV-1a of a string: a stable hash for the held-out split (std's hasher may change).
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Whether the emoji named `caption` is held out (a tenth, by hash of the name).
pub fn emoji_held_out(caption: &str) -> bool {
    fnv(caption).is_multiple_of(10)
}

/// Reads the fetched emoji set in `dir` (`emoji.json`, `64/*.png`) as `(train, held_out)`.
/// Errors name the file and entry at fault.
pub fn load_emoji(dir: &Path) -> Result<(Vec<Emoji>, Vec<Emoji>)> {
    let path = dir.join("emoji.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}; {REFETCH}", path.display()))?;
    let list: serde_json::Value = serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is not valid JSON (damaged or truncated); {REFETCH}",
            path.display()
        )
    })?;
    let Some(list) = list.as_array() else {
        bail!(
            "{}: expected a JSON list of emoji objects; {REFETCH}",
            path.display()
        );
    };
    let (mut train, mut test) = (Vec::new(), Vec::new());
    for (i, e) in list.iter().enumerate() {
        let (Some(name), Some(image)) = (e["name"].as_str(), e["image"].as_str()) else {
            bail!(
                "{}: entry {i} has no `name` and `image` strings; {REFETCH}",
                path.display()
            );
        };
        ensure!(
            !image.contains('/') && !image.contains('\\'),
            "{}: entry {i}: image `{image}` is not a file name",
            path.display()
        );
        let caption = words(name).collect::<Vec<_>>().join(" ");
        if caption.is_empty() {
            continue;
        }
        let file = dir.join("64").join(image);
        let bytes = std::fs::read(&file).with_context(|| {
            format!(
                "cannot read {} (entry {i} of emoji.json); {REFETCH}",
                file.display()
            )
        })?;
        let (w, h, rgba) = decode_png(&bytes, &file.display().to_string())?;
        let emoji = Emoji {
            pixels: to_input(w, h, &rgba),
            caption,
        };
        if emoji_held_out(&emoji.caption) {
            test.push(emoji);
        } else {
            train.push(emoji);
        }
    }
    ensure!(
        !train.is_empty() && !test.is_empty(),
        "{}: too few emoji ({} for training, {} held out); {REFETCH}",
        path.display(),
        train.len(),
        test.len()
    );
    Ok((train, test))
}

/// A random training scene for stream position `position` of a run with `seed`: one or two
/// objects, partial captions.
pub fn train_scene(seed: u64, position: u64) -> Scene {
    let mut rng = StdRng::seed_from_u64(mix(seed, 0x5343_454e_4500_0000, position));
    let n = if rng.gen_bool(0.5) { 1 } else { 2 };
    Scene::random(&mut rng, Split::Train, n, true)
}

/// The fixed evaluation scenes of `split`: `n` scenes alternating one and two objects, fully
/// captioned, the same for every run seed.
pub fn eval_scenes(split: Split, n: usize) -> Vec<Scene> {
    let salt = match split {
        Split::Train => 0x5345_454e,
        Split::HeldOut => 0x484f_4c44,
    };
    (0..n)
        .map(|i| {
            let mut rng = StdRng::seed_from_u64(mix(0xe7a1, salt, i as u64));
            Scene::random(&mut rng, split, 1 + i % 2, false)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenes_are_deterministic() {
        for p in 0..50 {
            assert_eq!(train_scene(3, p), train_scene(3, p));
            assert_eq!(train_scene(3, p).render(), train_scene(3, p).render());
        }
        assert_ne!(train_scene(3, 0), train_scene(4, 0));
        assert_eq!(
            eval_scenes(Split::HeldOut, 20),
            eval_scenes(Split::HeldOut, 20)
        );
        let s = &eval_scenes(Split::HeldOut, 2)[1];
        assert_eq!(s.objects.len(), 2);
        assert!(s.caption().contains(" and a "), "{}", s.caption());
    }

    #[test]
    fn held_out_pairs_never_train() {
        for p in 0..5000 {
            let s = train_scene(11, p);
            for o in &s.objects {
                assert!(!held_out(o.shape, o.colour), "{s:?}");
            }
        }
        for s in eval_scenes(Split::HeldOut, 200) {
            assert!(
                s.objects.iter().any(|o| held_out(o.shape, o.colour)),
                "{s:?}"
            );
        }
        // Every shape and every colour is still seen in training, with other partners.
        for shape in 0..SHAPES.len() {
            assert!((0..COLOURS.len()).any(|c| !held_out(shape, c)));
        }
        for colour in 0..COLOURS.len() {
            assert!((0..SHAPES.len()).any(|s| !held_out(s, colour)));
        }
        assert_eq!(held_out_singles().len(), 80);
        let seen = singles(Split::Train);
        assert_eq!(seen.len(), 80);
        assert!(seen
            .iter()
            .all(|s| !HELD_OUT.contains(&(s.objects[0].shape, s.objects[0].colour))));
    }

    #[test]
    fn scenes_render_their_colours() {
        let s = &held_out_singles()[0]; // a small blue circle on the left
        assert_eq!(s.caption(), "a small blue circle on the left");
        let img = s.render();
        let at = |c: usize, y: usize, x: usize| img[c * SIDE * SIDE + y * SIDE + x];
        assert!(
            at(2, 16, 8) > 0.9 && at(0, 16, 8) < 0.3,
            "blue at the centre"
        );
        assert_eq!(at(2, 16, 24), 0.0, "nothing on the right");
    }

    #[test]
    fn tokenizer_round_trip_and_eos() -> Result<()> {
        let v = Vocab::build([scene_words().as_str(), "grinning face"])?;
        let c = "a large red circle on the left and a cyan ring at the top";
        let ids = v.encode(c, CONTEXT);
        assert_eq!(ids.len(), CONTEXT);
        assert_eq!(ids[14], EOS);
        assert!(ids[15..].iter().all(|&i| i == PAD));
        assert!(ids[..14].iter().all(|&i| (FIRST_WORD..EOS).contains(&i)));
        assert_eq!(v.decode(&ids), c);
        assert_eq!(v.encode("a purple unicorn", 8)[2], UNK);
        assert_eq!(v.decode(&v.encode("a purple unicorn", 8)), "a purple <unk>");
        // Truncation keeps the end-of-text token.
        let short = v.encode(c, 4);
        assert_eq!(
            short,
            [
                v.encode("a", 2)[0],
                v.encode("large", 2)[0],
                v.encode("red", 2)[0],
                EOS
            ]
        );
        let path = std::env::temp_dir().join(format!("na-vocab-{}.json", std::process::id()));
        v.save(&path, "both")?;
        let (back, data) = Vocab::load(&path)?;
        assert_eq!((back, data.as_str()), (v.clone(), "both"));
        std::fs::remove_file(path).ok();
        Ok(())
    }

    #[test]
    fn pngs_decode_and_composite() -> Result<()> {
        // A 2×2 RGBA image: opaque red, transparent, half-transparent white, opaque black.
        let mut bytes = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut bytes, 2, 2);
            enc.set_color(png::ColorType::Rgba);
            enc.set_depth(png::BitDepth::Eight);
            let mut w = enc.write_header()?;
            w.write_image_data(&[255, 0, 0, 255, 0, 0, 0, 0, 255, 255, 255, 128, 0, 0, 0, 255])?;
        }
        let (w, h, rgba) = decode_png(&bytes, "t.png")?;
        let img = to_input(w, h, &rgba);
        assert_eq!(img.len(), PIXELS);
        assert!((img[0] - 1.0).abs() < 1e-6 && img[SIDE * SIDE].abs() < 1e-6);
        assert!(
            (img[SIDE - 1] - 0.5).abs() < 1e-6,
            "transparent: the background"
        );
        assert!(decode_png(b"not a png", "bad.png")
            .unwrap_err()
            .to_string()
            .contains("bad.png"));
        Ok(())
    }
}
