"""GATE's trained heads (weights/heads/): committed templates up to date, on-the-fly bilinear sampling equal
to F.interpolate, the TorchScript classifier equal to the eager reference, the random walk, the
amalgamation network's loss."""
import os
import tempfile
import unittest

import torch
import torch.nn.functional as F

from weights.heads import amalgamation, common, pixel_classifier, reference
from weights.heads import export as heads_export

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HEADS = os.path.join(ROOT, 'models', 'heads')


def configured(cfg, seed=0):
    """A scripted classifier shaped by configure() and filled by init_rule(), as the native side does."""
    m = pixel_classifier.script()
    shapes = m.configure(cfg)
    g = torch.Generator().manual_seed(seed)
    for name, shape in shapes.items():
        kind, v = m.init_rule(name)
        t = torch.empty(shape).normal_(0, v, generator=g) if kind == 'normal' else torch.full(shape, v)
        getattr(m, name).data = t
    return m


class TestTemplatesUpToDate(unittest.TestCase):
    def test_committed_templates(self):
        for name in heads_export.HEADS:
            path = os.path.join(HEADS, name)
            self.assertTrue(os.path.exists(path), path + ' missing (run python3 weights/heads/export.py)')
            extra = {'source_sha256': ''}
            torch.jit.load(path, _extra_files=extra)
            self.assertEqual(extra['source_sha256'].decode(), heads_export.source_sha256(name),
                             name + ' is stale: re-run python3 weights/heads/export.py')

    def test_export_writes_loadable_files(self):
        with tempfile.TemporaryDirectory() as d:
            for p in heads_export.save(d):
                m = torch.jit.load(p)
                self.assertTrue(hasattr(m, 'configure') and hasattr(m, 'loss'))
            self.assertEqual(sorted(os.listdir(d)), sorted(heads_export.HEADS))


class TestBilinear(unittest.TestCase):
    def test_matches_interpolate(self):
        torch.manual_seed(0)
        for (h, w, H, W) in [(4, 4, 16, 16), (5, 3, 12, 7), (8, 8, 8, 8), (6, 6, 25, 25)]:
            f = torch.randn(2, 7, h, w)
            up = F.interpolate(f, size=(H, W), mode='bilinear', align_corners=False)
            img = torch.randint(0, 2, (300,))
            y = torch.randint(0, H, (300,))
            x = torch.randint(0, W, (300,))
            got = common.bilinear_pixels(f.permute(0, 2, 3, 1).contiguous(), img, y, x, H, W)
            want = up[img, :, y, x]
            self.assertLess((got - want).abs().max().item(), 1e-5, (h, w, H, W))


class TestPixelClassifier(unittest.TestCase):
    def test_configure_shapes_and_init(self):
        m = configured({'buckets': [3, 1], 'channels': [10, 4], 'classes': [5], 'members': [1], 'out_size': [8, 8]})
        self.assertEqual(list(m.a_w1.shape), [1, 128, 14])
        self.assertEqual(list(m.c_w2.shape), [1, 5, 32])
        self.assertAlmostEqual(m.c_w0.std().item(), 0.02, delta=0.002)
        self.assertEqual(m.c_b0.abs().sum().item(), 0)
        self.assertEqual(m.input_channels(), 34)
        big = configured({'buckets': [1], 'channels': [4], 'classes': [30], 'members': [1], 'out_size': [8, 8]})
        self.assertEqual(list(big.hidden), [256, 128])
        with self.assertRaises(Exception):
            configured({'buckets': [1, 2], 'channels': [4], 'classes': [3], 'members': [1], 'out_size': [8, 8]})

    def test_loss_matches_eager_reference(self):
        torch.manual_seed(1)
        cfg = {'buckets': [3, 1], 'channels': [6, 5], 'classes': [4], 'members': [1], 'out_size': [8, 8]}
        m = configured(cfg, seed=3)
        ref = reference.PixelClassifierRef([3, 1], [6, 5], 4)
        sd = {k: v for k, v in list(m.named_parameters()) + list(m.named_buffers())}
        ref.load_head(sd)
        feats = torch.randn(2, 23, 4, 4)
        pixels = torch.stack([torch.randint(0, 2, (40,)), torch.randint(0, 8, (40,)), torch.randint(0, 8, (40,))], 1)
        labels = torch.randint(0, 4, (40,))
        idx = torch.arange(0, 40, 3)
        noise = torch.rand(m.noise_shape(idx.numel()))
        m.train()
        ref.train()
        m.s = 0.3  # exercise the regulariser's gradient
        loss = m.loss([pixels, labels, feats.permute(0, 2, 3, 1).contiguous()], idx, noise)
        up = F.interpolate(feats, size=(8, 8), mode='bilinear', align_corners=False)
        x = up[pixels[idx, 0], :, pixels[idx, 1], pixels[idx, 2]]
        logits, p = ref(x, noise)
        ce = F.cross_entropy(logits, labels[idx])
        rloss = ce - 0.3 * ce.detach() * p / p.detach()
        self.assertLess(abs(loss.item() - rloss.item()), 1e-5)
        loss.backward()
        rloss.backward()
        self.assertLess((m.c_w0.grad[0] - ref.mlp[0].weight.grad).abs().max().item(), 1e-5)
        self.assertLess((m.a_w1.grad[0, :, :6] - ref.assigners[0].fc1.weight.grad).abs().max().item(), 1e-5)
        # the regulariser's gradient is not zero (the softmax weights get pushed)
        self.assertGreater(m.a_w2.grad.abs().sum().item(), 0)
        # running statistics updated like nn.BatchNorm1d (the first bucket's call updates them first)
        self.assertLess((m.c_rm0[0] - ref.mlp[2].running_mean).abs().max().item(), 1e-5)
        self.assertLess((m.c_rv1[0] - ref.mlp[5].running_var).abs().max().item(), 1e-5)

    def test_assigner_output_bias_has_no_effect(self):
        # a_b2 shifts every bucket's logit of a channel alike: the softmax over buckets cancels it
        m = configured({'buckets': [3], 'channels': [4], 'classes': [3], 'members': [1], 'out_size': [4, 4]})
        m.eval()
        x = torch.randn(9, 12)
        before = m(x)
        with torch.no_grad():
            m.a_b2.add_(torch.randn(m.a_b2.shape))
        self.assertLess((m(x) - before).abs().max().item(), 1e-5)

    def test_vote_is_majority_and_segment_shape(self):
        m = configured({'buckets': [1], 'channels': [3], 'classes': [3], 'members': [3], 'out_size': [6, 6]})
        m.eval()
        # members: two predict class 2 everywhere, one class 0 -> vote 2
        with torch.no_grad():
            for k in range(3):
                m.c_w2[k].zero_()
                m.c_b2[k].copy_(torch.tensor([1.0, 0.0, 0.0]) if k == 0 else torch.tensor([0.0, 0.0, 1.0]))
        self.assertTrue(torch.equal(m.vote(torch.randn(5, 3)), torch.full([5], 2)))
        seg = m.segment(torch.randn(3, 3, 3), 6, 6, 7)
        self.assertEqual(list(seg.shape), [6, 6])
        self.assertTrue(torch.equal(seg, torch.full([6, 6], 2)))

    def test_walk_matches_reference(self):
        g = torch.Generator().manual_seed(5)
        w = reference.SparsityWalk()
        s, s_last, record, check = 0.0, 0.0, 0.0, -1.0
        for step in range(1, 400):
            loss = 2.0 / step + 0.01 * float(torch.rand(1, generator=g))
            u = torch.rand(4, generator=g)
            s, s_last, record, check = common.walk(step, loss, u, s, s_last, record, check, 5, 1e-5, 0.9, 0.05)
            w.step(step, loss, u)
            self.assertEqual((s, s_last, record, check), (w.s, w.s_last, w.record, w.check_loss))
        self.assertGreater(s, 0.0)


class TestAmalgamation(unittest.TestCase):
    def make(self, k=3, c=5, e=2, conv=0, scalar=0):
        m = amalgamation.script()
        shapes = m.configure({'buckets': [k], 'channels': [c], 'extra': [e], 'grid': [4, 4], 'output_conv': [conv],
                              'scalar_weights': [scalar]})
        g = torch.Generator().manual_seed(0)
        for name, shape in shapes.items():
            kind, v = m.init_rule(name)
            getattr(m, name).data = torch.empty(shape).normal_(0, v, generator=g) if kind == 'normal' else torch.full(shape, v)
        return m

    def test_forward_is_per_channel_softmax_mix(self):
        m = self.make()
        m.eval()
        x = torch.randn(2, 17, 4, 4)
        f = m(x)
        self.assertEqual(list(f.shape), [2, 7, 4, 4])
        self.assertTrue(torch.equal(f[:, 5:], x[:, 15:]))  # pass-through channels
        # identical buckets -> the mix is that bucket whatever the weights
        same = torch.cat([x[:, :5]] * 3 + [x[:, 15:]], 1)
        self.assertLess((m(same)[:, :5] - x[:, :5]).abs().max().item(), 1e-5)
        self.assertEqual(list(self.make(conv=1)(x).shape), [2, 7, 4, 4])

    def test_scalar_weights_are_one_weight_per_bucket(self):
        # buckets of constant value b + 1: a per-bucket weight gives the same mix in every channel, the
        # code's per-channel weights (random N(0, 0.02) assigner) do not
        x = torch.cat([torch.full((2, 5, 4, 4), float(b + 1)) for b in range(3)] + [torch.randn(2, 2, 4, 4)], 1)
        for scalar in (0, 1):
            m = self.make(scalar=scalar)
            self.assertEqual(list(m.fc_w.shape), [1 if scalar else 5, 128])
            m.eval()
            f = m(x)[:, :5]
            spread = (f - f[:, :1]).abs().max().item()
            if scalar:
                self.assertLess(spread, 1e-6)
            else:
                self.assertGreater(spread, 1e-4)
            self.assertTrue(bool(((f > 1) & (f < 3)).all()))  # a convex mix of 1, 2, 3

    def test_symmetric_clip_loss(self):
        m = self.make(e=2)
        feats = [torch.randn(17, 4, 4) for _ in range(3)]
        pairs = torch.tensor([[0, 1], [2, 0]])
        kps = torch.tensor([[[0, 5], [3, 3], [15, 0]], [[1, 1], [0, 0], [0, 0]]])
        counts = torch.tensor([3, 1])
        m.eval()  # no dropout: compare with a hand computation
        loss = m.loss([pairs, kps, counts] + feats, torch.tensor([0]), torch.empty(0))
        f = m(torch.stack([feats[0], feats[1]]))
        f1 = F.normalize(f[0].reshape(7, 16), dim=0, eps=0)
        f2 = F.normalize(f[1].reshape(7, 16), dim=0, eps=0)
        src, tgt = torch.tensor([0, 3, 15]), torch.tensor([5, 3, 0])
        want = 0.5 * (F.cross_entropy(f1[:, src].t() @ f2 / 0.07, tgt) + F.cross_entropy(f2[:, tgt].t() @ f1 / 0.07, src))
        self.assertLess(abs(loss.item() - want.item()), 1e-5)
        # training mode: dropout from the given draw, gradients reach the assigner
        m.train()
        loss = m.loss([pairs, kps, counts] + feats, torch.tensor([1]), torch.rand(m.noise_shape(1)))
        loss.backward()
        self.assertTrue(torch.isfinite(loss).item())
        self.assertGreater(m.conv_w.grad.abs().sum().item(), 0)


if __name__ == '__main__':
    unittest.main()
