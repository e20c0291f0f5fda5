//! Reading and writing safetensors files by hand, to make the broken or upstream-shaped
//! checkpoints the load tests need.

/// A stored tensor: its shape and its raw little-endian bytes.
pub type Raw = (Vec<usize>, Vec<u8>);

/// The tensors of a safetensors file as (name, (shape, raw bytes)).
pub fn safetensors_view(bytes: &[u8]) -> Vec<(String, Raw)> {
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let data = &bytes[8 + header_len..];
    header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, v)| {
            let shape = v["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect();
            let off = v["data_offsets"].as_array().unwrap();
            let (a, z) = (
                off[0].as_u64().unwrap() as usize,
                off[1].as_u64().unwrap() as usize,
            );
            (k.clone(), (shape, data[a..z].to_vec()))
        })
        .collect()
}

/// Writes f32 tensors as a safetensors file.
pub fn write_f32_file(path: &std::path::Path, tensors: &[(String, Raw)]) {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (k, (shape, bytes)) in tensors {
        header.insert(
            k.clone(),
            serde_json::json!({
                "dtype": "F32",
                "shape": shape,
                "data_offsets": [data.len(), data.len() + bytes.len()],
            }),
        );
        data.extend_from_slice(bytes);
    }
    let mut h = serde_json::to_vec(&serde_json::Value::Object(header)).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(data);
    std::fs::write(path, out).unwrap();
}
