//! A layer table in the style of torchinfo's or Keras's `summary()`.

use serde::Serialize;
use std::fmt;

/// One line of a [`Summary`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SummaryRow {
    /// Nesting depth: 0 for the top model's own layers.
    pub depth: usize,
    /// Dotted path of the layer, equal to the prefix of its checkpoint keys (`blocks.3.attn`).
    pub name: String,
    /// The layer type as declared (`Linear<784, 128>`).
    pub layer: String,
    /// Output shape as the DSL computed it; runtime sizes keep their names (`[B, 128]`).
    pub output: String,
    /// Trainable parameters of the layer, children included.
    pub params: usize,
}

/// The layer table of a model, printable with `{}`, serializable to JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// The model's type name.
    pub model: String,
    /// Declared inputs (`x: [B, 784]`), or empty when the model is a chain without a signature.
    pub inputs: String,
    /// One row per layer, children right after their parent.
    pub rows: Vec<SummaryRow>,
    /// Trainable parameters of the whole model.
    pub total_params: usize,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name_w = self
            .rows
            .iter()
            .map(|r| r.depth * 2 + r.name.len())
            .chain([5])
            .max()
            .unwrap_or(5);
        let layer_w = self
            .rows
            .iter()
            .map(|r| r.layer.len())
            .chain([4])
            .max()
            .unwrap_or(4);
        let out_w = self
            .rows
            .iter()
            .map(|r| r.output.len())
            .chain([12])
            .max()
            .unwrap_or(12);
        let total_w = name_w + layer_w + out_w + 16 + 9;
        let rule = "=".repeat(total_w);
        writeln!(f, "{}", self.model)?;
        if !self.inputs.is_empty() {
            writeln!(f, "input: {}", self.inputs)?;
        }
        writeln!(f, "{rule}")?;
        writeln!(
            f,
            "{:name_w$}   {:layer_w$}   {:out_w$}   {:>16}",
            "Layer", "Type", "Output shape", "Param #"
        )?;
        writeln!(f, "{}", "-".repeat(total_w))?;
        for r in &self.rows {
            let name = format!("{}{}", "  ".repeat(r.depth), r.name);
            writeln!(
                f,
                "{name:name_w$}   {:layer_w$}   {:out_w$}   {:>16}",
                r.layer,
                r.output,
                group_digits(r.params)
            )?;
        }
        writeln!(f, "{rule}")?;
        writeln!(f, "Total params: {}", group_digits(self.total_params))
    }
}

/// `1234567` -> `1,234,567`, as torchinfo prints counts.
fn group_digits(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digits_are_grouped() {
        assert_eq!(group_digits(0), "0");
        assert_eq!(group_digits(999), "999");
        assert_eq!(group_digits(1000), "1,000");
        assert_eq!(group_digits(124_439_808), "124,439,808");
    }
}
