//! The vendored candle-core's backward pass (vendor/README.md): the first gradient to reach a
//! tensor is stored as it is instead of being added to a fresh tensor of zeros, a matmul whose
//! right side is a transposed view (`x · wᵀ`) computes that side's gradient in the view's layout,
//! and gradients keep their values, shapes and contiguity. Hand-worked cases on the CPU. The
//! signed zero (`0 + (-0) = +0`) tells the first change from the release, so a re-vendored
//! candle without it fails here; the second changes no value (the backward pass drops the view's
//! gradient once used, so its layout cannot be seen from here), and its cases check that the
//! new path gives the release's gradients.

use candle_core::{DType, Device, Tensor, Var};

fn bits(t: &Tensor) -> Vec<u32> {
    qat_model::custom_op::f32_bits(t).unwrap()
}

/// The gradient of `Σ y` with respect to `x`.
fn grad_of_sum(y: candle_core::Result<Tensor>, x: &Var) -> Tensor {
    let grads = y.unwrap().sum_all().unwrap().backward().unwrap();
    grads.get(x.as_tensor()).expect("a gradient").clone()
}

#[test]
fn the_first_gradient_is_stored_as_it_is() {
    // d/dx sum(x · c) = c; with c = [-0, 2] the gradient's first element is -0, which a sum
    // with zeros would turn into +0.
    let x = Var::new(&[3f32, 4.0], &Device::Cpu).unwrap();
    let c = Tensor::new(&[-0f32, 2.0], &Device::Cpu).unwrap();
    let g = grad_of_sum(x.as_tensor() * &c, &x);
    assert_eq!(bits(&g), [(-0f32).to_bits(), 2f32.to_bits()]);
}

#[test]
fn fan_in_subtraction_broadcast_and_transpose_keep_their_gradients() {
    let dev = Device::Cpu;
    // x feeds two products: d/dx sum(x·a + x·b) = a + b.
    let x = Var::new(&[1f32, 2.0, 3.0], &dev).unwrap();
    let a = Tensor::new(&[0.5f32, -1.0, 4.0], &dev).unwrap();
    let b = Tensor::new(&[2f32, 3.0, -0.25], &dev).unwrap();
    let y = (x.as_tensor() * &a).unwrap() + (x.as_tensor() * &b).unwrap();
    let g: Vec<f32> = grad_of_sum(y, &x).to_vec1().unwrap();
    assert_eq!(g, [2.5, 2.0, 3.75]);

    // The right side of a subtraction gets the negated gradient, first or not: d/dx sum(a − x) =
    // −1, d/dx sum(x − x·2) = 1 − 2 = −1.
    let g: Vec<f32> = grad_of_sum(&a - x.as_tensor(), &x).to_vec1().unwrap();
    assert_eq!(g, [-1.0, -1.0, -1.0]);
    let two_x = (x.as_tensor() * 2.0).unwrap();
    let g: Vec<f32> = grad_of_sum(x.as_tensor() - &two_x, &x).to_vec1().unwrap();
    assert_eq!(g, [-1.0, -1.0, -1.0]);

    // Broadcast [3] → [2, 3]: each element is used twice.
    let w = Tensor::new(&[[1f32, 2.0, 3.0], [10.0, 20.0, 30.0]], &dev).unwrap();
    let y = x.as_tensor().broadcast_as((2, 3)).unwrap().mul(&w);
    let g: Vec<f32> = grad_of_sum(y, &x).to_vec1().unwrap();
    assert_eq!(g, [11.0, 22.0, 33.0]);

    // A rule with a few steps between reading the gradient and storing it (SiLU, used by the
    // CPU's composed SwiGLU): silu'(x) = σ(x)·(1 + x·(1 − σ(x))), 0.5 at 0 and
    // 0.7310586 · 1.2689414 = 0.9276705 at 1.
    let s = Var::new(&[0f32, 1.0], &dev).unwrap();
    let g: Vec<f32> = grad_of_sum(s.as_tensor().silu(), &s).to_vec1().unwrap();
    assert!(
        (g[0] - 0.5).abs() < 1e-6 && (g[1] - 0.9276705).abs() < 1e-6,
        "{g:?}"
    );

    // A transpose's gradient is a strided view: it is stored contiguous, as a sum would be.
    let m = Var::new(&[[1f32, 2.0, 3.0], [4.0, 5.0, 6.0]], &dev).unwrap();
    let weights = Tensor::new(&[[1f32, 2.0], [3.0, 4.0], [5.0, 6.0]], &dev).unwrap();
    let g = grad_of_sum(m.as_tensor().t().unwrap().mul(&weights), &m);
    assert!(g.is_contiguous());
    assert_eq!(
        g.to_vec2::<f32>().unwrap(),
        [[1.0, 3.0, 5.0], [2.0, 4.0, 6.0]]
    );
}

#[test]
fn a_first_gradient_of_the_wrong_dtype_is_an_error_as_before() {
    // A custom op whose backward returns another dtype than its input's: `zeros + grad` refused
    // it, and so does the direct store.
    #[derive(Debug)]
    struct BadGrad;
    impl candle_core::CustomOp1 for BadGrad {
        fn name(&self) -> &'static str {
            "bad-grad"
        }
        fn cpu_fwd(
            &self,
            s: &candle_core::CpuStorage,
            l: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            Ok((s.clone(), l.shape().clone()))
        }
        fn bwd(
            &self,
            _arg: &Tensor,
            _res: &Tensor,
            grad: &Tensor,
        ) -> candle_core::Result<Option<Tensor>> {
            Ok(Some(grad.to_dtype(DType::F64)?))
        }
    }
    let x = Var::new(&[1f32, 2.0], &Device::Cpu).unwrap();
    let y = x.as_tensor().apply_op1(BadGrad).unwrap();
    let err = y.sum_all().unwrap().backward().unwrap_err().to_string();
    assert!(err.contains("dtype mismatch"), "{err}");
}

/// An op that casts f32 to bf16 and hands back the bf16 gradient as it is (what qat's fake
/// quantizer of f32 master weights does for bf16 compute).
#[derive(Debug)]
struct CastToBf16KeepingItsGradient;
impl candle_core::CustomOp1 for CastToBf16KeepingItsGradient {
    fn name(&self) -> &'static str {
        "cast-to-bf16"
    }
    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let candle_core::CpuStorage::F32(v) = s else {
            candle_core::bail!("f32 only")
        };
        let (a, b) = l.contiguous_offsets().expect("contiguous");
        let out = v[a..b].iter().map(|&x| half::bf16::from_f32(x)).collect();
        Ok((candle_core::CpuStorage::BF16(out), l.shape().clone()))
    }
    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.clone()))
    }
}

#[test]
fn an_f32_tensor_may_hold_a_bf16_gradient_and_sums_in_f32() {
    let x = Var::new(&[1f32, 2.0, 3.0], &Device::Cpu).unwrap();
    let w = Tensor::new(&[0.5f32, 1.0 / 3.0, 3.0], &Device::Cpu)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    // One use: the bf16 gradient itself.
    let y = x
        .as_tensor()
        .apply_op1(CastToBf16KeepingItsGradient)
        .unwrap();
    let grads = (y * &w).unwrap().sum_all().unwrap().backward().unwrap();
    let g = grads.get(&x).unwrap();
    assert_eq!(g.dtype(), DType::BF16);
    assert_eq!(
        g.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap(),
        w.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap()
    );
    // Two uses (weights w and 2^-9), with and without an f32 one (weight 2^-10): summed in f32,
    // where every partial sum is exact; in bf16 they would not be (w + 2^-9 + 2^-10 needs more
    // than bf16's 8 significant bits).
    let bf16_use = |weights: &Tensor| {
        (x.as_tensor()
            .apply_op1(CastToBf16KeepingItsGradient)
            .unwrap()
            * weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    };
    let small = (w.ones_like().unwrap() * 2f64.powi(-9)).unwrap();
    let w32 = w.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
    for with_f32_use in [false, true] {
        let mut total = (bf16_use(&w) + bf16_use(&small)).unwrap();
        if with_f32_use {
            let f32_use = (x.as_tensor() * 2f64.powi(-10)).unwrap().sum_all().unwrap();
            total = (total + f32_use).unwrap();
        }
        let g = total.backward().unwrap();
        let g = g.get(&x).unwrap();
        assert_eq!(g.dtype(), DType::F32);
        let extra = if with_f32_use { 2f32.powi(-10) } else { 0.0 };
        let want: Vec<f32> = w32.iter().map(|w| w + 2f32.powi(-9) + extra).collect();
        assert_eq!(
            g.to_vec1::<f32>().unwrap(),
            want,
            "with an f32 use: {with_f32_use}"
        );
    }
}

/// `[rows, cols]` f32 tensor from row-major values.
fn matrix(values: &[f32], rows: usize, cols: usize) -> Tensor {
    Tensor::from_vec(values.to_vec(), (rows, cols), &Device::Cpu).unwrap()
}

#[test]
fn a_transposed_right_side_gets_its_gradient_in_its_own_layout() {
    // y = x · wᵀ (a linear layer), L = Σ y ⊙ c: dL/dx = c · w, dL/dw = cᵀ · x.
    // x = [[1, 2, 3], [4, 5, 6]], w = [[1, 0, -1], [2, 1, 0]], c = [[1, 2], [3, -1]]:
    // dL/dw = [[1·1 + 3·4, 1·2 + 3·5, 1·3 + 3·6], [2·1 − 1·4, 2·2 − 1·5, 2·3 − 1·6]]
    //       = [[13, 17, 21], [-2, -1, 0]],
    // dL/dx = [[1·1 + 2·2, 1·0 + 2·1, −1 + 0], [3·1 − 2, 0 − 1, −3 − 0]] = [[5, 2, -1], [1, -1, -3]].
    let x = Var::from_tensor(&matrix(&[1., 2., 3., 4., 5., 6.], 2, 3)).unwrap();
    let w = Var::from_tensor(&matrix(&[1., 0., -1., 2., 1., 0.], 2, 3)).unwrap();
    let c = matrix(&[1., 2., 3., -1.], 2, 2);
    let wt = w.as_tensor().t().unwrap();
    let y = x.as_tensor().matmul(&wt).unwrap();
    let grads = (y * &c).unwrap().sum_all().unwrap().backward().unwrap();
    let gw = grads.get(w.as_tensor()).unwrap();
    assert!(gw.is_contiguous());
    assert_eq!(
        gw.to_vec2::<f32>().unwrap(),
        [[13.0, 17.0, 21.0], [-2.0, -1.0, 0.0]]
    );
    let gx = grads.get(x.as_tensor()).unwrap();
    assert_eq!(
        gx.to_vec2::<f32>().unwrap(),
        [[5.0, 2.0, -1.0], [1.0, -1.0, -3.0]]
    );
    // The same view used by two matmuls: the gradients add. L = Σ (x·wᵀ) + Σ (x·wᵀ ⊙ c):
    // dL/dw = 1ᵀ·x + cᵀ·x = [[5, 7, 9], [5, 7, 9]] + the above.
    let y1 = x.as_tensor().matmul(&wt).unwrap();
    let y2 = (x.as_tensor().matmul(&wt).unwrap() * &c).unwrap();
    let grads = (y1.sum_all().unwrap() + y2.sum_all().unwrap())
        .unwrap()
        .backward()
        .unwrap();
    assert_eq!(
        grads.get(w.as_tensor()).unwrap().to_vec2::<f32>().unwrap(),
        [[18.0, 24.0, 30.0], [3.0, 6.0, 9.0]]
    );
}

#[test]
fn batched_and_other_transposes_keep_their_gradients() {
    let dev = Device::Cpu;
    // Attention scores q · kᵀ over a batch of 2: dL/dk[b] = c[b]ᵀ · q[b] per batch element, the
    // same numbers as the unbatched case in each (q = x, k = w, c as above; the second batch
    // element scaled by 2 in q, so its gradient doubles).
    let q = Tensor::cat(
        &[
            matrix(&[1., 2., 3., 4., 5., 6.], 2, 3)
                .unsqueeze(0)
                .unwrap(),
            matrix(&[2., 4., 6., 8., 10., 12.], 2, 3)
                .unsqueeze(0)
                .unwrap(),
        ],
        0,
    )
    .unwrap();
    let k = Var::from_tensor(
        &matrix(&[1., 0., -1., 2., 1., 0.], 2, 3)
            .unsqueeze(0)
            .unwrap()
            .repeat((2, 1, 1))
            .unwrap(),
    )
    .unwrap();
    let c = matrix(&[1., 2., 3., -1.], 2, 2)
        .unsqueeze(0)
        .unwrap()
        .repeat((2, 1, 1))
        .unwrap();
    let scores = q.matmul(&k.as_tensor().t().unwrap()).unwrap();
    let gk = grad_of_sum(scores * &c, &k);
    assert!(gk.is_contiguous());
    assert_eq!(
        gk.to_vec3::<f32>().unwrap(),
        [
            [[13.0, 17.0, 21.0], [-2.0, -1.0, 0.0]],
            [[26.0, 34.0, 42.0], [-4.0, -2.0, 0.0]]
        ]
    );

    // A transpose of other dimensions than the last two takes the release's path: rhs =
    // kᵀ over dims 0 and 1 of a [2, 3, 1] tensor ([3, 2, 1]) is not `x.t()`. With a = 1,
    // L = Σ a · rhs[b] over b = 0..3 (a [1, 2] · [2, 1] product per batch element):
    // dL/drhs[b] = aᵀ · 1 = [[1], [1]] for every b, so dL/dk = ones.
    let k3 = Var::from_tensor(
        &Tensor::arange(0f32, 6.0, &dev)
            .unwrap()
            .reshape((2, 3, 1))
            .unwrap(),
    )
    .unwrap();
    let rhs = k3.as_tensor().transpose(0, 1).unwrap(); // [3, 2, 1]
    let a = Tensor::ones((3, 1, 2), DType::F32, &dev).unwrap();
    let g = grad_of_sum(a.matmul(&rhs), &k3);
    assert!(g.is_contiguous());
    assert_eq!(g.flatten_all().unwrap().to_vec1::<f32>().unwrap(), [1.0; 6]);
}
