//! The vendored candle-core's backward pass (vendor/README.md): the first gradient to reach a
//! tensor is stored as it is instead of being added to a fresh tensor of zeros, and gradients
//! keep their values, shapes and contiguity. Hand-worked cases on the CPU; the signed zero is
//! what tells the two apart (`0 + (-0) = +0`), so a re-vendored candle without the change fails
//! here.

use candle_core::{DType, Device, Tensor, Var};

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

#[test]
fn the_first_gradient_is_stored_as_it_is() {
    // d/dx sum(x · c) = c; with c = [-0, 2] the gradient's first element is -0, which a sum
    // with zeros would turn into +0.
    let x = Var::new(&[3f32, 4.0], &Device::Cpu).unwrap();
    let c = Tensor::new(&[-0f32, 2.0], &Device::Cpu).unwrap();
    let grads = (x.as_tensor() * &c)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let g = grads.get(x.as_tensor()).unwrap();
    assert_eq!(bits(g), [(-0f32).to_bits(), 2f32.to_bits()]);
}

#[test]
fn fan_in_subtraction_broadcast_and_transpose_keep_their_gradients() {
    let dev = Device::Cpu;
    // x feeds two products: d/dx sum(x·a + x·b) = a + b.
    let x = Var::new(&[1f32, 2.0, 3.0], &dev).unwrap();
    let a = Tensor::new(&[0.5f32, -1.0, 4.0], &dev).unwrap();
    let b = Tensor::new(&[2f32, 3.0, -0.25], &dev).unwrap();
    let y = ((x.as_tensor() * &a).unwrap() + (x.as_tensor() * &b).unwrap()).unwrap();
    let grads = y.sum_all().unwrap().backward().unwrap();
    let g: Vec<f32> = grads.get(x.as_tensor()).unwrap().to_vec1().unwrap();
    assert_eq!(g, [2.5, 2.0, 3.75]);

    // The right side of a subtraction gets the negated gradient, first or not: d/dx sum(a − x) =
    // −1, d/dx sum(x − x·2) = 1 − 2 = −1.
    let grads = (&a - x.as_tensor())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let g: Vec<f32> = grads.get(x.as_tensor()).unwrap().to_vec1().unwrap();
    assert_eq!(g, [-1.0, -1.0, -1.0]);
    let two_x = (x.as_tensor() * 2.0).unwrap();
    let grads = (x.as_tensor() - &two_x)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let g: Vec<f32> = grads.get(x.as_tensor()).unwrap().to_vec1().unwrap();
    assert_eq!(g, [-1.0, -1.0, -1.0]);

    // Broadcast [3] → [2, 3]: each element is used twice.
    let w = Tensor::new(&[[1f32, 2.0, 3.0], [10.0, 20.0, 30.0]], &dev).unwrap();
    let y = x.as_tensor().broadcast_as((2, 3)).unwrap().mul(&w).unwrap();
    let grads = y.sum_all().unwrap().backward().unwrap();
    let g: Vec<f32> = grads.get(x.as_tensor()).unwrap().to_vec1().unwrap();
    assert_eq!(g, [11.0, 22.0, 33.0]);

    // A rule with a few steps between reading the gradient and storing it (SiLU, used by the
    // CPU's composed SwiGLU): silu'(x) = σ(x)·(1 + x·(1 − σ(x))), 0.5 at 0 and
    // 0.7310586 · 1.2689414 = 0.9276705 at 1.
    let s = Var::new(&[0f32, 1.0], &dev).unwrap();
    let grads = s
        .as_tensor()
        .silu()
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let g: Vec<f32> = grads.get(s.as_tensor()).unwrap().to_vec1().unwrap();
    assert!(
        (g[0] - 0.5).abs() < 1e-6 && (g[1] - 0.9276705).abs() < 1e-6,
        "{g:?}"
    );

    // A transpose's gradient is a strided view: it is stored contiguous, as a sum would be.
    let m = Var::new(&[[1f32, 2.0, 3.0], [4.0, 5.0, 6.0]], &dev).unwrap();
    let weights = Tensor::new(&[[1f32, 2.0], [3.0, 4.0], [5.0, 6.0]], &dev).unwrap();
    let y = m.as_tensor().t().unwrap().mul(&weights).unwrap();
    let grads = y.sum_all().unwrap().backward().unwrap();
    let g = grads.get(m.as_tensor()).unwrap();
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
