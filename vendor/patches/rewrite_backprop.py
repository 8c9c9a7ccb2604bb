"""Rewrites candle-core 0.11.1's src/backprop.rs so that the first gradient reaching a node is
stored as it is instead of being added into a fresh tensor of zeros (later ones are still added),
so that a matmul whose rhs is a transposed view computes that gradient in the view's layout, and
so that an f32 tensor may hold a bf16 / f16 gradient (cast to f32 before any sum)."""
import re, sys

path = sys.argv[1]
s = open(path).read()
n0 = s.count("grads.or_insert(")

# `let X = grads.or_insert(Y)?;  *X = X.add(EXPR)?[;]`  ->  `grads.accumulate(Y, EXPR)?[;]`
add = re.compile(r"let (\w+) = grads\.or_insert\((\w+)\)\?;\n(\s*)\*\1 = \1\.add\((.*)\)\?(;?)\n")
def add_repl(m):
    var, arg, indent, expr, semi = m.groups()
    expr = expr.replace(f"{var}.dims()", f"{arg}.dims()")
    return f"grads.accumulate({arg}, {expr})?{semi}\n"
s, n_add = add.subn(add_repl, s)

# `let X = grads.or_insert(Y)?;  *X = X.sub(EXPR)?[;]`  ->  `grads.accumulate_neg(Y, EXPR)?[;]`
sub = re.compile(r"let (\w+) = grads\.or_insert\((\w+)\)\?;\n(\s*)\*\1 = \1\.sub\((.*)\)\?(;?)\n")
def sub_repl(m):
    var, arg, indent, expr, semi = m.groups()
    return f"grads.accumulate_neg({arg}, {expr})?{semi}\n"
s, n_sub = sub.subn(sub_repl, s)

# The same with statements between the two lines that compute the gradient without reading the
# slot: `let X = grads.or_insert(Y)?; BODY; *X = X.add|sub(EXPR)?[;]` -> `BODY; grads.accumulate(Y, EXPR)?[;]`.
multi = re.compile(
    r"let (\w+) = grads\.or_insert\((\w+)\)\?;\n((?:(?!.*\1)[^\n]*\n)+?)(\s*)\*\1 = \1\.(add|sub)\((.*)\)\?(;?)\n"
)
def multi_repl(m):
    var, arg, body, indent, op, expr, semi = m.groups()
    call = "accumulate" if op == "add" else "accumulate_neg"
    return f"{body.lstrip()}{indent}grads.{call}({arg}, {expr})?{semi}\n"
s, n_multi = multi.subn(multi_repl, s)

helpers = '''
    /// Adds `grad` to the gradient of `tensor`, or, for the first gradient to reach it, stores
    /// `grad` as it is (made contiguous, as a sum would be), instead of adding it to zeros.
    fn accumulate(&mut self, tensor: &Tensor, grad: &Tensor) -> Result<()> {
        match self.0.entry(tensor.id()) {
            Entry::Occupied(mut entry) => {
                let (prev, grad) = widened(tensor, entry.get(), grad)?;
                let sum = prev.add(&grad)?;
                *entry.get_mut() = sum;
            }
            Entry::Vacant(entry) => {
                check_first_grad(tensor, grad)?;
                entry.insert(grad.contiguous()?);
            }
        }
        Ok(())
    }

    /// [`Self::accumulate`] of `-grad`: subtracts it, or stores its negation.
    fn accumulate_neg(&mut self, tensor: &Tensor, grad: &Tensor) -> Result<()> {
        match self.0.entry(tensor.id()) {
            Entry::Occupied(mut entry) => {
                let (prev, grad) = widened(tensor, entry.get(), grad)?;
                let diff = prev.sub(&grad)?;
                *entry.get_mut() = diff;
            }
            Entry::Vacant(entry) => {
                check_first_grad(tensor, grad)?;
                entry.insert(grad.neg()?);
            }
        }
        Ok(())
    }

    /// Get the gradient tensor associated with the given tensor, or, if it does not exist,'''
anchor = '''
    /// Get the gradient tensor associated with the given tensor, or, if it does not exist,'''
assert anchor in s
s = s.replace(anchor, helpers, 1)

check = '''
/// Whether `grad` may stand as the gradient of `tensor` although their dtypes differ: a bf16 or
/// f16 gradient of an f32 tensor, which an op whose forward pass casts f32 to 16 bits may return
/// (its values are exact in f32; consumers cast it, and [`widened`] does before any sum).
fn narrower_exact_grad(tensor: &Tensor, grad: &Tensor) -> bool {
    tensor.dtype() == crate::DType::F32
        && matches!(grad.dtype(), crate::DType::BF16 | crate::DType::F16)
}

/// `prev` and `grad`, the stored gradient of `tensor` and one more, as their sum takes them: as
/// they are, or both cast to `tensor`'s dtype when either is a narrower gradient.
fn widened(tensor: &Tensor, prev: &Tensor, grad: &Tensor) -> Result<(Tensor, Tensor)> {
    if prev.dtype() == grad.dtype() && prev.dtype() == tensor.dtype() {
        return Ok((prev.clone(), grad.clone()));
    }
    let wide = |g: &Tensor| {
        if narrower_exact_grad(tensor, g) {
            g.to_dtype(tensor.dtype())
        } else {
            Ok(g.clone())
        }
    };
    Ok((wide(prev)?, wide(grad)?))
}

/// The checks `zeros_like(tensor) + grad` made: the same shape (no broadcasting), dtype and device
/// (except for [`narrower_exact_grad`]s).
fn check_first_grad(tensor: &Tensor, grad: &Tensor) -> Result<()> {
    if tensor.shape() != grad.shape() {
        return Err(crate::Error::ShapeMismatchBinaryOp {
            lhs: tensor.shape().clone(),
            rhs: grad.shape().clone(),
            op: "add",
        }
        .bt());
    }
    if tensor.dtype() != grad.dtype() && !narrower_exact_grad(tensor, grad) {
        return Err(crate::Error::DTypeMismatchBinaryOp {
            lhs: tensor.dtype(),
            rhs: grad.dtype(),
            op: "add",
        }
        .bt());
    }
    if !tensor.device().same_device(grad.device()) {
        return Err(crate::Error::DeviceMismatchBinaryOp {
            lhs: tensor.device().location(),
            rhs: grad.device().location(),
            op: "add",
        }
        .bt());
    }
    Ok(())
}

/// A store for gradients, associating'''
anchor2 = "\n/// A store for gradients, associating"
assert anchor2 in s, "store doc"
s = s.replace(anchor2, check, 1)
# Matmul: when rhs is a transposed view (`x · wᵀ`, the weight of every linear layer; `q · kᵀ`),
# its gradient is computed transposed, `(gradᵀ · lhs)ᵀ`: the same GEMM with the operands' roles
# swapped, giving a view in rhs's own layout whose transpose (the Transpose rule) is contiguous,
# so `w` gets its gradient without the transpose copy that `lhsᵀ · grad` needed.
matmul_old = """                        let rhs_grad = lhs.t()?.matmul(&grad)?;
                        grads.accumulate(rhs, &rhs_grad)?;
"""
matmul_new = """                        if is_last_two_transpose(rhs) {
                            // rhs = wᵀ: (gradᵀ · lhs)ᵀ is rhs's gradient in rhs's own layout, so
                            // the Transpose rule hands w a contiguous gradient with no copy.
                            let rhs_grad = grad.t()?.matmul(lhs)?.t()?;
                            grads.accumulate_keep_layout(rhs, &rhs_grad)?;
                        } else {
                            let rhs_grad = lhs.t()?.matmul(&grad)?;
                            grads.accumulate(rhs, &rhs_grad)?;
                        }
"""
assert s.count(matmul_old) == 1, "matmul rule"
s = s.replace(matmul_old, matmul_new, 1)

keep = '''
    /// [`Self::accumulate`] for a transposed view's gradient that is itself such a view (see the
    /// Matmul rule): a first gradient is stored in its own layout, not made contiguous.
    fn accumulate_keep_layout(&mut self, tensor: &Tensor, grad: &Tensor) -> Result<()> {
        match self.0.entry(tensor.id()) {
            Entry::Occupied(mut entry) => {
                let (prev, grad) = widened(tensor, entry.get(), grad)?;
                let sum = prev.add(&grad)?;
                *entry.get_mut() = sum;
            }
            Entry::Vacant(entry) => {
                check_first_grad(tensor, grad)?;
                entry.insert(grad.clone());
            }
        }
        Ok(())
    }

    /// Get the gradient tensor associated with the given tensor, or, if it does not exist,'''
assert anchor in s
s = s.replace(anchor, keep, 1)

is_t = '''
/// Whether `t` is a transpose of its last two dimensions (what `x.t()` records).
fn is_last_two_transpose(t: &Tensor) -> bool {
    let rank = t.rank();
    match t.op() {
        Some(Op::Transpose(_, d1, d2)) if rank >= 2 => {
            let last_two = (rank - 2, rank - 1);
            (*d1, *d2) == last_two || (*d2, *d1) == last_two
        }
        _ => false,
    }
}

/// A store for gradients, associating'''
s = s.replace(anchor2, is_t, 1)

n1 = s.count("grads.or_insert(")
print(f"{path}: matmul rhs rule rewritten; {n_add} add, {n_sub} sub and {n_multi} multi-line sites rewritten; or_insert calls {n0} -> {n1}", file=sys.stderr)
open(path, "w").write(s)
