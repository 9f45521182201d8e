"""Evaluation: PSNR / SSIM under the paper's protocols (`metrics`), score files, the evaluator."""
