from .unet_conditional import ConditionalUNet, ConditionalUNetOutput, to_unet2d_condition_config

__all__ = ["ConditionalUNet", "ConditionalUNetOutput", "to_unet2d_condition_config"]
