"""The projection blog's unit-circle toy with the blog's settings (Adam and gradient descent).

L_primary = (sqrt(x^2 + y^2) - 1)^2, L_auxiliary = (x - 2)^2 + y^2, start (0, 2), lambda 0.1,
Adam (lr 0.01, betas 0.9 / 0.999) and vanilla gradient descent (lr 0.01).

    .venv/bin/python examples/toys/unit_circle_toy.py   # writes runs/toys/blog_circle.png
(same as `gradsim toy`, which also writes runs/toys/blog_circle.md)
"""

from lightning_gradsim.experiments.toy_blog import OPTIMIZERS, blog_circle_report, plot_blog_circle, run_blog_circle

if __name__ == "__main__":
    paths = {opt: run_blog_circle(opt) for opt in OPTIMIZERS}
    print(plot_blog_circle(paths, "runs/toys/blog_circle.png"))
    print(blog_circle_report(paths))
