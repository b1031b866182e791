"""Names the gateway wires by, taken from the generated descriptors, never spelled by hand."""

from grpc_health.v1 import health_pb2

from projects.v1 import project_service_pb2, queue_service_pb2

QUEUE_SERVICE_NAME = queue_service_pb2.DESCRIPTOR.services_by_name["QueueService"].full_name
PROJECT_SERVICE_NAME = project_service_pb2.DESCRIPTOR.services_by_name["ProjectService"].full_name
HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
