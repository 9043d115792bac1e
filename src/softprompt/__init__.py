"""softprompt: train, evaluate, inspect and serve soft prompts (prompt tuning) on frozen language models."""

from .config import DistillConfig, EvalConfig, GenerateConfig, InspectConfig, ServeConfig, TrainConfig
from .errors import SoftPromptError
from .distill import DistillResult, distill
from .evaluate import evaluate
from .generate import generate
from .model import BaseModel, load_model
from .peft_io import export_peft, import_peft
from .prompt import SoftPrompt
from .train import TrainResult, train

__all__ = ["BaseModel", "DistillConfig", "DistillResult", "EvalConfig", "GenerateConfig", "InspectConfig", "ServeConfig",
           "SoftPrompt", "SoftPromptError", "TrainConfig", "TrainResult",
           "distill", "evaluate", "export_peft",
           "generate", "import_peft", "load_model", "train"]
__version__ = "0.1.0"
