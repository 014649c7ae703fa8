print("sorajax: use python -m sorajax.train | sorajax.sample | sorajax.evaluate (each has --help)")
