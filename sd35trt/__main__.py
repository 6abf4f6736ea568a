from sd35trt.cli import main
import sys
sys.exit(main())
