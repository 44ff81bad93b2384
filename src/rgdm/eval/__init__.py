"""rgdm.eval"""
