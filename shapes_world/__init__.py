"""The Shapes world: the paper's recipe at toy size on a CPU. world.py makes scenes, questions and data files;
backbones/ holds the toy "pretrained" models that train_backbones.py trains once; plan.py runs shapes.py's steps
(skipping finished ones) and report.py turns their results into tables and figures."""
