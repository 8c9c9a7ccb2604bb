"""Rewrites candle-core 0.11.1's src/backprop.rs so that the first gradient reaching a node is
stored as it is instead of being added into a fresh tensor of zeros (later ones are still added)."""
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
                let sum = entry.get().add(grad)?;
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
                let diff = entry.get().sub(grad)?;
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
/// The checks `zeros_like(tensor) + grad` made: the same shape (no broadcasting), dtype and device.
fn check_first_grad(tensor: &Tensor, grad: &Tensor) -> Result<()> {
    if tensor.shape() != grad.shape() {
        return Err(crate::Error::ShapeMismatchBinaryOp {
            lhs: tensor.shape().clone(),
            rhs: grad.shape().clone(),
            op: "add",
        }
        .bt());
    }
    if tensor.dtype() != grad.dtype() {
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
n1 = s.count("grads.or_insert(")
print(f"{path}: {n_add} add, {n_sub} sub and {n_multi} multi-line sites rewritten; or_insert calls {n0} -> {n1}", file=sys.stderr)
open(path, "w").write(s)
