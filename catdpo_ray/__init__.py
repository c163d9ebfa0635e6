"""catdpo-ray: category-adaptive safety alignment (Cat-DPO) on Ray Train + DeepSpeed.

Importing the package is cheap: it pulls in neither Ray nor DeepSpeed nor transformers.
The pure core (``losses``, ``dual``, ``eval.metrics``) imports only torch; ``train`` is the
only subpackage that touches DeepSpeed.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
