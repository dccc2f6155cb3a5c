"""The unit-circle toy: every point of the unit circle minimises the main loss (|theta|^2 - 1)^2; the
auxiliary |theta - (2, 0)|^2 should only choose where on the circle to land, not pull off it.

    .venv/bin/python examples/toys/unit_circle_toy.py   # writes runs/toys/circle.png
(same as `gradsim toy --problem circle`)
"""

from lightning_gradsim.experiments.toys import plot_trajectories, run_toy

if __name__ == "__main__":
    paths = run_toy("circle", ["main_only", "sum", "unweighted", "weighted", "projection"], steps=300, lr=0.05)
    print(plot_trajectories("circle", paths, "runs/toys/circle.png"))
    for rule, traj in paths.items():
        print(f"  {rule:<11} final radii {[round(r, 3) for r in traj[-1].norm(dim=-1).tolist()]}")
