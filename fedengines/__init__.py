"""How a federation's clients are run, beyond the in-process engine of engine.py: over torchrun ranks
(torchrun.py), as a Flower App (flower_app.py) under the Simulation Engine or a SuperLink, with SuperNodes that train
on their own folders (nodes.py) and fork ClientApps warm (flower_exec.py), and a whole deployment on 127.0.0.1
(localhost.py, what deploy.py runs). The method's modules at the root never import from here except the torchrun
group that pretraining.py joins when launched under torchrun; everything here builds on them."""
