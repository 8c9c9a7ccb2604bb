//! Reading one quantized layer back from a packed file: dtype and shape checks, bit unpacking,
//! and the range checks of `formats/packed.md` section 6 (codes, zero points, padding bits,
//! scales), giving the layer's [`WeightCodes`].

use crate::bits::unpack_row;
use crate::error::{OutOfRange, PackError, Result};
use crate::layout::LayerEntry;
use half::f16;
use qat_quant::WeightCodes;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use std::path::Path;

/// The view of tensor `name`, checked to have `dtype` and `shape`.
pub(crate) fn checked_view<'a>(
    st: &SafeTensors<'a>,
    path: &Path,
    name: &str,
    dtype: Dtype,
    shape: &[usize],
) -> Result<TensorView<'a>> {
    let view = st.tensor(name).map_err(|_| PackError::MissingTensor {
        path: path.to_path_buf(),
        name: name.to_string(),
    })?;
    if view.dtype() != dtype {
        return Err(PackError::Dtype {
            path: path.to_path_buf(),
            name: name.to_string(),
            found: format!("{:?}", view.dtype()),
            expected: format!("{dtype:?}"),
        });
    }
    if view.shape() != shape {
        return Err(PackError::Shape {
            path: path.to_path_buf(),
            name: name.to_string(),
            found: view.shape().to_vec(),
            expected: shape.to_vec(),
        });
    }
    Ok(view)
}

/// Reads and checks the codes, scales and zero points of the layer `entry` describes.
pub fn read_layer(st: &SafeTensors<'_>, path: &Path, entry: &LayerEntry) -> Result<WeightCodes> {
    let (out, inp, b) = (entry.out_features, entry.in_features, entry.bits);
    let range = |name: String, what, row, index_name, index, found: String, expected: String| {
        PackError::OutOfRange(Box::new(OutOfRange {
            path: path.to_path_buf(),
            name,
            what,
            row,
            index_name,
            index,
            found,
            expected,
        }))
    };

    let qname = entry.qweight_name();
    let qweight = checked_view(st, path, &qname, Dtype::U8, &entry.qweight_shape())?;
    let bpr = entry.bytes_per_row();
    let pad_bits = 8 * bpr - inp * usize::from(b);
    let max_code = entry.max_code();
    let mut codes = Vec::with_capacity(out * inp);
    for (row, bytes) in qweight.data().chunks(bpr.max(1)).enumerate() {
        let start = codes.len();
        let padding = unpack_row(bytes, inp, b, &mut codes);
        if padding != 0 {
            let found = format!("last byte {:#010b}", bytes[bpr - 1]);
            let expected = format!(
                "its top {pad_bits} padding bit(s) 0 ({inp} codes of {b} bits in {bpr} bytes)"
            );
            return Err(range(
                qname,
                "padding bits",
                row,
                "byte",
                bpr - 1,
                found,
                expected,
            ));
        }
        if let Some(i) = codes[start..].iter().position(|&c| c > max_code) {
            let found = codes[start + i].to_string();
            let expected = format!("0..={max_code} ({} with {b} bits)", entry.format);
            return Err(range(qname, "code", row, "column", i, found, expected));
        }
    }

    let sname = entry.scales_name();
    let sview = checked_view(st, path, &sname, Dtype::F16, &entry.scales_shape())?;
    let scales: Vec<f16> = sview
        .data()
        .chunks_exact(2)
        .map(|c| f16::from_le_bytes([c[0], c[1]]))
        .collect();
    let per_row = scales.len() / out.max(1);
    let per_group = if entry.is_nf3() { 2 } else { 1 };
    if let Some(k) = scales
        .iter()
        .position(|s| !s.is_finite() || s.is_sign_negative())
    {
        let (row, group) = (k / per_row, (k % per_row) / per_group);
        let what = match (entry.is_nf3(), k % 2) {
            (true, 0) => "scale s_pos",
            (true, _) => "scale s_neg",
            (false, _) => "scale",
        };
        return Err(range(
            sname,
            what,
            row,
            "group",
            group,
            scales[k].to_string(),
            "a finite f16 >= +0".into(),
        ));
    }

    let zname = entry.zeros_name();
    let zeros = if entry.has_zeros() {
        let zview = checked_view(st, path, &zname, Dtype::U8, &entry.zeros_shape())?;
        let zeros = zview.data().to_vec();
        let max = entry.max_zero();
        if let Some(k) = zeros.iter().position(|&z| z > max) {
            let n = entry.n_groups();
            return Err(range(
                zname,
                "zero point",
                k / n,
                "group",
                k % n,
                zeros[k].to_string(),
                format!("0..={max} ({b} bits)"),
            ));
        }
        Some(zeros)
    } else {
        if st.tensor(&zname).is_ok() {
            return Err(PackError::UnexpectedTensor {
                path: path.to_path_buf(),
                name: zname,
                why: "only asym_group layers have zero points",
            });
        }
        None
    };
    Ok(WeightCodes {
        out_features: out,
        in_features: inp,
        group_size: entry.group_size,
        codes,
        scales,
        zeros,
        mins: None,
    })
}
