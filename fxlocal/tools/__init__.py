"""What is built on a converted or trained model: ``zoo`` (the zoo check), ``verify`` (gradient
isolation, export fidelity), ``export`` (the backbone under its own names), ``plot`` (a plan)."""
