"""Apply a :class:`infra.stack.Stack` to AWS (or LocalStack / moto) with boto3.

Every step looks the resource up by its name or the stack tag first and creates or
updates only what differs from the desired state, recording a :class:`Change`; so a second
deploy of the same stack records nothing but ``unchanged`` and says so. :func:`destroy`
walks the same names backwards; :func:`status` only reads.

Secrets: generated ones (JWT key, passwords) are created once with ``secrets.token_hex``
and never rotated by a deploy; derived ones (database URLs) are rewritten only when RDS's
endpoint changes. Task definitions reference secrets by ARN; no secret value is ever put
into a task definition, a log line or the report.
"""

from __future__ import annotations

import functools
import json
import secrets as secrets_lib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from infra.stack import (
    HEALTH_GRACE_S,
    HTTPS_PORT,
    POSTGRES_PORT,
    STACK_TAG,
    Stack,
    Task,
)
from pms import process
from pms.embedded import ANALYST_ROLE, APP_ROLE

#: DB instance tag set once the db-init task succeeded (so later deploys skip it).
DB_INITIALISED_TAG = "pms:db-initialised"
#: AWS's current recommended TLS policy for ALB HTTPS listeners (TLS 1.2 and 1.3 only).
TLS_POLICY = "ELBSecurityPolicy-TLS13-1-2-2021-06"
EXECUTION_POLICY_ARN = "arn:aws:iam::aws:policy/service-role/AmazonECSTaskExecutionRolePolicy"


class InfraError(RuntimeError):
    """A deploy, status or destroy step could not complete; the message says which and why."""


@dataclass(frozen=True, slots=True)
class Change:
    resource: str
    name: str
    action: str  # create | update | delete | run | unchanged


@dataclass
class Report:
    """What a deploy or destroy did, in order; ``on_change`` sees each step as it happens."""

    on_change: Callable[[Change], None] | None = None
    changes: list[Change] = field(default_factory=list)

    def add(self, resource: str, name: str, action: str) -> None:
        change = Change(resource, name, action)
        self.changes.append(change)
        if self.on_change is not None:
            self.on_change(change)

    @property
    def changed(self) -> list[Change]:
        return [c for c in self.changes if c.action != "unchanged"]


@dataclass
class Clients:
    ec2: Any
    ecs: Any
    elbv2: Any
    rds: Any
    secretsmanager: Any
    logs: Any
    servicediscovery: Any
    iam: Any

    @classmethod
    def connect(cls, region: str, endpoint_url: str | None = None) -> Clients:
        """boto3 clients for ``region``; with an ``endpoint_url`` (LocalStack, moto) and no
        configured credentials, the conventional dummy ``test``/``test`` pair is used.

        Cached per (region, endpoint): building eight clients loads eight service models (~1 s).
        """
        return _connect(region, endpoint_url)

    @classmethod
    def _build(cls, region: str, endpoint_url: str | None) -> Clients:
        session = boto3.session.Session(region_name=region)
        if endpoint_url and session.get_credentials() is None:
            session = boto3.session.Session(
                region_name=region, aws_access_key_id="test", aws_secret_access_key="test"
            )
        config = Config(retries={"max_attempts": 8, "mode": "standard"}, connect_timeout=10, read_timeout=60)

        def client(name: str) -> Any:
            return session.client(name, endpoint_url=endpoint_url, config=config)  # type: ignore[call-overload]

        return cls(
            ec2=client("ec2"), ecs=client("ecs"), elbv2=client("elbv2"), rds=client("rds"),
            secretsmanager=client("secretsmanager"), logs=client("logs"),
            servicediscovery=client("servicediscovery"), iam=client("iam"),
        )


@functools.lru_cache(maxsize=8)
def _connect(region: str, endpoint_url: str | None) -> Clients:
    return Clients._build(region, endpoint_url)


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _ec2_tags(stack: Stack, name: str) -> list[dict[str, str]]:
    return [{"Key": "Name", "Value": name}, *({"Key": k, "Value": v} for k, v in stack.tags.items())]


def _kv_tags(stack: Stack) -> list[dict[str, str]]:
    return [{"Key": k, "Value": v} for k, v in stack.tags.items()]


def _ecs_tags(stack: Stack) -> list[dict[str, str]]:
    return [{"key": k, "value": v} for k, v in stack.tags.items()]


def _matches(desired: Any, actual: Any) -> bool:
    """Whether ``actual`` (as AWS returns it, with defaults filled in) carries everything in ``desired``."""
    if isinstance(desired, dict):
        return isinstance(actual, dict) and all(_matches(v, actual.get(k)) for k, v in desired.items())
    if isinstance(desired, list):
        if not isinstance(actual, list) or len(desired) != len(actual):
            return False
        if desired and all(isinstance(d, dict) and "name" in d for d in desired):
            desired = sorted(desired, key=lambda d: d["name"])
            actual = sorted(actual, key=lambda d: str(d.get("name")))
        return all(_matches(d, a) for d, a in zip(desired, actual, strict=True))
    return bool(desired == actual)


# ---------------------------------------------------------------------------------------
# deploy
# ---------------------------------------------------------------------------------------


@dataclass
class Deployed:
    """Identifiers found or created during a deploy (and read by status/destroy)."""

    vpc_id: str | None = None
    subnet_ids: dict[str, str] = field(default_factory=dict)
    group_ids: dict[str, str] = field(default_factory=dict)
    secret_arns: dict[str, str] = field(default_factory=dict)
    role_arn: str | None = None
    db_endpoint: tuple[str, int] | None = None
    db_arn: str | None = None
    namespace_id: str | None = None
    registry_arns: dict[str, str] = field(default_factory=dict)
    load_balancer_arn: str | None = None
    load_balancer_dns: str | None = None
    target_group_arns: dict[str, str] = field(default_factory=dict)
    task_definition_arns: dict[str, str] = field(default_factory=dict)


Waiter = Callable[[str, Callable[[], bool]], None]


class Deployer:
    """Brings the account to ``stack``; one instance per run."""

    def __init__(self, stack: Stack, clients: Clients, *, report: Report, wait: Waiter) -> None:
        self.stack = stack
        self.aws = clients
        self.report = report
        self.wait = wait
        self.ids = Deployed()

    def deploy(self) -> Deployed:
        self._network()
        self._security_groups()
        self._log_groups()
        self._generated_secrets()
        self._execution_role()
        self._database()
        self._derived_secrets()
        self._cluster()
        self._task_definitions()
        self._db_init()
        self._service_discovery()
        self._load_balancer()
        self._services()
        self._wait_steady()
        return self.ids

    # -- network ---------------------------------------------------------------------------
    def _network(self) -> None:
        ec2, stack = self.aws.ec2, self.stack
        vpcs = ec2.describe_vpcs(Filters=[{"Name": f"tag:{STACK_TAG}", "Values": [stack.name]}])["Vpcs"]
        if vpcs:
            vpc = vpcs[0]
            if vpc["CidrBlock"] != stack.vpc_cidr:
                raise InfraError(
                    f"VPC {vpc['VpcId']} has CIDR {vpc['CidrBlock']}, not {stack.vpc_cidr}; a VPC's CIDR cannot "
                    "change in place: destroy the stack or keep PMS_INFRA__VPC_CIDR"
                )
            self.report.add("vpc", stack.name, "unchanged")
        else:
            vpc = ec2.create_vpc(
                CidrBlock=stack.vpc_cidr,
                TagSpecifications=[{"ResourceType": "vpc", "Tags": _ec2_tags(stack, stack.name)}],
            )["Vpc"]
            ec2.modify_vpc_attribute(VpcId=vpc["VpcId"], EnableDnsSupport={"Value": True})
            ec2.modify_vpc_attribute(VpcId=vpc["VpcId"], EnableDnsHostnames={"Value": True})
            self.report.add("vpc", stack.name, "create")
        vpc_id = self.ids.vpc_id = vpc["VpcId"]

        zones = sorted(
            z["ZoneName"] for z in ec2.describe_availability_zones()["AvailabilityZones"]
            if z.get("State", "available") == "available"
        )
        if len(zones) < 2:
            raise InfraError(f"region {stack.region} offers fewer than two availability zones")
        for subnet in stack.subnets:
            found = ec2.describe_subnets(Filters=[
                {"Name": "vpc-id", "Values": [vpc_id]}, {"Name": "tag:Name", "Values": [subnet.name]},
            ])["Subnets"]
            if found:
                self.ids.subnet_ids[subnet.name] = found[0]["SubnetId"]
                self.report.add("subnet", subnet.name, "unchanged")
                continue
            created = ec2.create_subnet(
                VpcId=vpc_id, CidrBlock=subnet.cidr, AvailabilityZone=zones[subnet.az_index],
                TagSpecifications=[{"ResourceType": "subnet", "Tags": _ec2_tags(stack, subnet.name)}],
            )["Subnet"]
            if subnet.public:
                ec2.modify_subnet_attribute(SubnetId=created["SubnetId"], MapPublicIpOnLaunch={"Value": True})
            self.ids.subnet_ids[subnet.name] = created["SubnetId"]
            self.report.add("subnet", subnet.name, "create")

        gateways = ec2.describe_internet_gateways(
            Filters=[{"Name": "attachment.vpc-id", "Values": [vpc_id]}]
        )["InternetGateways"]
        if gateways:
            igw_id = gateways[0]["InternetGatewayId"]
            self.report.add("internet-gateway", stack.name, "unchanged")
        else:
            igw_id = ec2.create_internet_gateway(TagSpecifications=[
                {"ResourceType": "internet-gateway", "Tags": _ec2_tags(stack, stack.name)}
            ])["InternetGateway"]["InternetGatewayId"]
            ec2.attach_internet_gateway(InternetGatewayId=igw_id, VpcId=vpc_id)
            self.report.add("internet-gateway", stack.name, "create")

        table_name = f"{stack.name}-public"
        tables = ec2.describe_route_tables(Filters=[
            {"Name": "vpc-id", "Values": [vpc_id]}, {"Name": "tag:Name", "Values": [table_name]},
        ])["RouteTables"]
        action = "unchanged"
        if tables:
            table = tables[0]
        else:
            table = ec2.create_route_table(VpcId=vpc_id, TagSpecifications=[
                {"ResourceType": "route-table", "Tags": _ec2_tags(stack, table_name)}
            ])["RouteTable"]
            action = "create"
        if not any(r.get("DestinationCidrBlock") == "0.0.0.0/0" for r in table.get("Routes", [])):
            ec2.create_route(RouteTableId=table["RouteTableId"], DestinationCidrBlock="0.0.0.0/0", GatewayId=igw_id)
            action = action if action == "create" else "update"
        associated = {a.get("SubnetId") for a in table.get("Associations", [])}
        for subnet in stack.subnets:
            subnet_id = self.ids.subnet_ids[subnet.name]
            if subnet.public and subnet_id not in associated:
                ec2.associate_route_table(RouteTableId=table["RouteTableId"], SubnetId=subnet_id)
                action = action if action == "create" else "update"
        self.report.add("route-table", table_name, action)

    def _subnets(self, *, public: bool) -> list[str]:
        return [self.ids.subnet_ids[s.name] for s in self.stack.subnets if s.public is public]

    def _security_groups(self) -> None:
        ec2, stack, vpc_id = self.aws.ec2, self.stack, self.ids.vpc_id
        created: set[str] = set()
        for group in stack.security_groups:
            found = ec2.describe_security_groups(Filters=[
                {"Name": "vpc-id", "Values": [vpc_id]}, {"Name": "group-name", "Values": [group.name]},
            ])["SecurityGroups"]
            if found:
                self.ids.group_ids[group.name] = found[0]["GroupId"]
            else:
                self.ids.group_ids[group.name] = ec2.create_security_group(
                    GroupName=group.name, Description=group.description, VpcId=vpc_id,
                    TagSpecifications=[{"ResourceType": "security-group", "Tags": _ec2_tags(stack, group.name)}],
                )["GroupId"]
                created.add(group.name)
        for group in stack.security_groups:
            group_id = self.ids.group_ids[group.name]
            current = ec2.describe_security_groups(GroupIds=[group_id])["SecurityGroups"][0]
            have = _permission_keys(current.get("IpPermissions", []))
            want = {
                ("tcp", rule.port_from, rule.port_to,
                 self.ids.group_ids[rule.source_group] if rule.source_group else rule.cidr)
                for rule in group.ingress
            }
            missing, extra = want - have, have - want
            if missing:
                ec2.authorize_security_group_ingress(GroupId=group_id, IpPermissions=_permissions(missing))
            if extra:
                ec2.revoke_security_group_ingress(GroupId=group_id, IpPermissions=_permissions(extra))
            changed = "update" if missing or extra else "unchanged"
            action = "create" if group.name in created else changed
            self.report.add("security-group", group.name, action)

    # -- logs, secrets, IAM ----------------------------------------------------------------
    def _log_groups(self) -> None:
        logs, stack = self.aws.logs, self.stack
        for name in stack.log_groups():
            found = [g for g in logs.describe_log_groups(logGroupNamePrefix=name)["logGroups"]
                     if g["logGroupName"] == name]
            if not found:
                logs.create_log_group(logGroupName=name, tags=dict(stack.tags))
                logs.put_retention_policy(logGroupName=name, retentionInDays=stack.log_retention_days)
                self.report.add("log-group", name, "create")
            elif found[0].get("retentionInDays") != stack.log_retention_days:
                logs.put_retention_policy(logGroupName=name, retentionInDays=stack.log_retention_days)
                self.report.add("log-group", name, "update")
            else:
                self.report.add("log-group", name, "unchanged")

    def _secret_arn(self, name: str) -> str | None:
        try:
            described = self.aws.secretsmanager.describe_secret(SecretId=name)
        except ClientError as exc:
            if _code(exc) == "ResourceNotFoundException":
                return None
            raise
        if described.get("DeletedDate"):
            self.aws.secretsmanager.restore_secret(SecretId=name)
        return str(described["ARN"])

    def _put_secret(self, key: str, value: str, *, overwrite: bool) -> None:
        spec = self.stack.secret(key)
        sm = self.aws.secretsmanager
        arn = self._secret_arn(spec.name)
        if arn is None:
            arn = sm.create_secret(
                Name=spec.name, Description=spec.description, SecretString=value, Tags=_kv_tags(self.stack)
            )["ARN"]
            self.report.add("secret", spec.name, "create")
        elif overwrite and sm.get_secret_value(SecretId=arn)["SecretString"] != value:
            sm.put_secret_value(SecretId=arn, SecretString=value)
            self.report.add("secret", spec.name, "update")
        else:
            self.report.add("secret", spec.name, "unchanged")
        self.ids.secret_arns[key] = str(arn)

    def _secret_value(self, key: str) -> str:
        return str(self.aws.secretsmanager.get_secret_value(SecretId=self.ids.secret_arns[key])["SecretString"])

    def _generated_secrets(self) -> None:
        for spec in self.stack.secrets:
            if not spec.derived:
                # Only used when the secret does not exist yet: a deploy never rotates a secret.
                self._put_secret(spec.key, secrets_lib.token_hex(32), overwrite=False)

    def _derived_secrets(self) -> None:
        assert self.ids.db_endpoint is not None
        host, port = self.ids.db_endpoint
        app, analyst, master = (self._secret_value(k) for k in
                                ("db-app-password", "db-analyst-password", "db-master-password"))
        values = {
            "database-url": f"postgresql+psycopg://{APP_ROLE}:{app}@{host}:{port}/postgres",
            "analyst-database-url": f"postgresql+psycopg://{ANALYST_ROLE}:{analyst}@{host}:{port}/analytics",
            "db-master-url": f"postgresql://{self.stack.database.master_user}:{master}@{host}:{port}/postgres",
        }
        for key, value in values.items():
            self._put_secret(key, value, overwrite=True)

    def _execution_role(self) -> None:
        iam, stack = self.aws.iam, self.stack
        name = stack.execution_role
        trust = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Principal": {"Service": "ecs-tasks.amazonaws.com"},
                           "Action": "sts:AssumeRole"}],
        }
        action = "unchanged"
        try:
            self.ids.role_arn = iam.get_role(RoleName=name)["Role"]["Arn"]
        except ClientError as exc:
            if _code(exc) != "NoSuchEntity":
                raise
            self.ids.role_arn = iam.create_role(
                RoleName=name, AssumeRolePolicyDocument=json.dumps(trust),
                Description=f"ECS task execution role of the {stack.name} stack", Tags=_kv_tags(stack),
            )["Role"]["Arn"]
            action = "create"
        attached = {p["PolicyArn"] for p in iam.list_attached_role_policies(RoleName=name)["AttachedPolicies"]}
        if EXECUTION_POLICY_ARN not in attached:
            iam.attach_role_policy(RoleName=name, PolicyArn=EXECUTION_POLICY_ARN)
            action = action if action == "create" else "update"
        # The tasks may read exactly this stack's secrets, nothing else.
        policy = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": ["secretsmanager:GetSecretValue"],
                           "Resource": [self._secret_pattern()]}],
        }
        try:
            current = iam.get_role_policy(RoleName=name, PolicyName="read-stack-secrets")["PolicyDocument"]
            if isinstance(current, str):
                current = json.loads(current)
        except ClientError as exc:
            if _code(exc) != "NoSuchEntity":
                raise
            current = None
        if current != policy:
            iam.put_role_policy(RoleName=name, PolicyName="read-stack-secrets", PolicyDocument=json.dumps(policy))
            action = action if action == "create" else "update"
        self.report.add("iam-role", name, action)

    def _secret_pattern(self) -> str:
        # Derived secrets are created after RDS, so the role names the stack's secrets by prefix.
        arn = next(iter(self.ids.secret_arns.values()))
        prefix = arn.split(":secret:")[0]
        return f"{prefix}:secret:{self.stack.name}/*"

    # -- database --------------------------------------------------------------------------
    def _database(self) -> None:
        rds, stack, db = self.aws.rds, self.stack, self.stack.database
        try:
            rds.describe_db_subnet_groups(DBSubnetGroupName=db.subnet_group)
            self.report.add("db-subnet-group", db.subnet_group, "unchanged")
        except ClientError as exc:
            if _code(exc) != "DBSubnetGroupNotFoundFault":
                raise
            rds.create_db_subnet_group(
                DBSubnetGroupName=db.subnet_group, DBSubnetGroupDescription=f"{stack.name} private subnets",
                SubnetIds=self._subnets(public=False), Tags=_kv_tags(stack),
            )
            self.report.add("db-subnet-group", db.subnet_group, "create")
        instance = self._db_instance()
        if instance is None:
            rds.create_db_instance(
                DBInstanceIdentifier=db.identifier, Engine="postgres", EngineVersion=db.engine_version,
                DBInstanceClass=db.instance_class, AllocatedStorage=db.allocated_storage_gb,
                MasterUsername=db.master_user, MasterUserPassword=self._secret_value("db-master-password"),
                DBSubnetGroupName=db.subnet_group, VpcSecurityGroupIds=[self.ids.group_ids[f"{stack.name}-db"]],
                PubliclyAccessible=False, StorageEncrypted=True, BackupRetentionPeriod=7,
                Port=POSTGRES_PORT, Tags=_kv_tags(stack),
            )
            self.report.add("db-instance", db.identifier, "create")
        elif (instance["DBInstanceClass"], int(instance["AllocatedStorage"])) != (
            db.instance_class, db.allocated_storage_gb
        ):
            rds.modify_db_instance(
                DBInstanceIdentifier=db.identifier, DBInstanceClass=db.instance_class,
                AllocatedStorage=db.allocated_storage_gb, ApplyImmediately=True,
            )
            self.report.add("db-instance", db.identifier, "update")
        else:
            self.report.add("db-instance", db.identifier, "unchanged")

        def available() -> bool:
            current = self._db_instance()
            return bool(current and current.get("DBInstanceStatus") == "available" and current.get("Endpoint"))

        self.wait(f"RDS {db.identifier} to be available", available)
        current = self._db_instance()
        assert current is not None
        self.ids.db_endpoint = (current["Endpoint"]["Address"], int(current["Endpoint"]["Port"]))
        self.ids.db_arn = current["DBInstanceArn"]

    def _db_instance(self) -> dict[str, Any] | None:
        try:
            found = self.aws.rds.describe_db_instances(DBInstanceIdentifier=self.stack.database.identifier)
        except ClientError as exc:
            if _code(exc) == "DBInstanceNotFound":
                return None
            raise
        return found["DBInstances"][0] if found["DBInstances"] else None

    # -- ECS -------------------------------------------------------------------------------
    def _cluster(self) -> None:
        ecs, stack = self.aws.ecs, self.stack
        if cluster_active(self.aws, stack):
            self.report.add("ecs-cluster", stack.cluster, "unchanged")
            return
        ecs.create_cluster(
            clusterName=stack.cluster, capacityProviders=["FARGATE"],
            settings=[{"name": "containerInsights", "value": "enabled"}], tags=_ecs_tags(stack),
        )
        self.report.add("ecs-cluster", stack.cluster, "create")

    def container_definition(self, task: Task) -> dict[str, Any]:
        """The container of ``task``'s task definition: image, command, port, env, secret ARNs, logs."""
        stack = self.stack
        container: dict[str, Any] = {
            "name": task.name,
            "image": stack.image,
            "essential": True,
            # The task's only container gets all of it (explicit, so every ECS flavour agrees on limits).
            "cpu": stack.task_cpu,
            "memory": stack.task_memory,
            "command": list(task.command),
            "environment": [{"name": k, "value": v} for k, v in sorted(task.environment.items())],
            "secrets": [{"name": k, "valueFrom": self.ids.secret_arns[v]} for k, v in sorted(task.secrets.items())],
            "logConfiguration": {
                "logDriver": "awslogs",
                "options": {"awslogs-group": task.log_group, "awslogs-region": stack.region,
                            "awslogs-stream-prefix": task.name},
            },
            # tini as PID 1, as with `init: true` in compose.
            "linuxParameters": {"initProcessEnabled": True},
            "stopTimeout": 30,
        }
        if task.entry_point:
            container["entryPoint"] = list(task.entry_point)
        if task.port is not None:
            container["portMappings"] = [{"containerPort": task.port, "protocol": "tcp", "name": task.name}]
        if task.metrics_port is not None:
            container.setdefault("portMappings", []).append(
                {"containerPort": task.metrics_port, "protocol": "tcp", "name": f"{task.name}-metrics"})
        if task.health_command:
            container["healthCheck"] = {"command": list(task.health_command), "interval": 15, "timeout": 5,
                                        "retries": 3, "startPeriod": 60}
        return container

    def task_definition(self, task: Task) -> dict[str, Any]:
        return {
            "family": task.family,
            "networkMode": "awsvpc",
            "requiresCompatibilities": ["FARGATE"],
            "cpu": str(self.stack.task_cpu),
            "memory": str(self.stack.task_memory),
            "executionRoleArn": self.ids.role_arn,
            "runtimePlatform": {"operatingSystemFamily": "LINUX", "cpuArchitecture": "X86_64"},
            "containerDefinitions": [self.container_definition(task)],
        }

    def _task_definitions(self) -> None:
        ecs = self.aws.ecs
        for task in self.stack.tasks:
            desired = self.task_definition(task)
            try:
                current = ecs.describe_task_definition(taskDefinition=task.family)["taskDefinition"]
            except ClientError as exc:
                if _code(exc) != "ClientException":
                    raise
                current = None
            if current is not None and current.get("status") == "ACTIVE" and _matches(desired, current):
                self.ids.task_definition_arns[task.name] = current["taskDefinitionArn"]
                self.report.add("task-definition", task.family, "unchanged")
                continue
            registered = ecs.register_task_definition(**desired, tags=_ecs_tags(self.stack))["taskDefinition"]
            self.ids.task_definition_arns[task.name] = registered["taskDefinitionArn"]
            self.report.add("task-definition", task.family, "create" if current is None else "update")

    def _db_init(self) -> None:
        """Run the one-off db-init task once per database instance (marked by a tag when it succeeded)."""
        rds, ecs, stack = self.aws.rds, self.aws.ecs, self.stack
        tags = rds.list_tags_for_resource(ResourceName=self.ids.db_arn)["TagList"]
        if any(t["Key"] == DB_INITIALISED_TAG and t["Value"] == "true" for t in tags):
            self.report.add("db-init", stack.db_init.family, "unchanged")
            return
        started = ecs.run_task(
            cluster=stack.cluster, taskDefinition=self.ids.task_definition_arns[stack.db_init.name],
            launchType="FARGATE", count=1, networkConfiguration=self._network_configuration(),
            startedBy="pms-infra-deploy",
        )
        if started.get("failures") or not started.get("tasks"):
            raise InfraError(f"db-init task did not start: {started.get('failures')}")
        task_arn = started["tasks"][0]["taskArn"]
        final: dict[str, Any] = {}

        def stopped() -> bool:
            described = ecs.describe_tasks(cluster=stack.cluster, tasks=[task_arn])["tasks"]
            if described and described[0]["lastStatus"] == "STOPPED":
                final.update(described[0])
                return True
            return False

        self.wait("the db-init task to finish", stopped)
        exit_codes = [c.get("exitCode") for c in final.get("containers", [])]
        if not exit_codes or any(code != 0 for code in exit_codes):
            raise InfraError(
                f"db-init task failed (exit codes {exit_codes}, reason: {final.get('stoppedReason', 'unknown')}); "
                f"see CloudWatch log group {stack.db_init.log_group}"
            )
        rds.add_tags_to_resource(ResourceName=self.ids.db_arn, Tags=[{"Key": DB_INITIALISED_TAG, "Value": "true"}])
        self.report.add("db-init", stack.db_init.family, "run")

    def _network_configuration(self) -> dict[str, Any]:
        return {"awsvpcConfiguration": {
            "subnets": self._subnets(public=True),
            "securityGroups": [self.ids.group_ids[f"{self.stack.name}-services"]],
            "assignPublicIp": "ENABLED",
        }}

    # -- service discovery -----------------------------------------------------------------
    def _service_discovery(self) -> None:
        sd, stack = self.aws.servicediscovery, self.stack
        namespace_id = find_namespace(self.aws, stack)
        if namespace_id is None:
            operation = sd.create_private_dns_namespace(
                Name=stack.namespace, Vpc=self.ids.vpc_id, CreatorRequestId=f"{stack.name}-namespace",
                Description=f"service names of the {stack.name} stack", Tags=_kv_tags(stack),
            )["OperationId"]

            def done() -> bool:
                status = sd.get_operation(OperationId=operation)["Operation"]["Status"]
                if status == "FAIL":
                    raise InfraError(f"creating Cloud Map namespace {stack.namespace} failed")
                return bool(status == "SUCCESS")

            self.wait(f"Cloud Map namespace {stack.namespace}", done)
            namespace_id = find_namespace(self.aws, stack)
            self.report.add("cloudmap-namespace", stack.namespace, "create")
        else:
            self.report.add("cloudmap-namespace", stack.namespace, "unchanged")
        assert namespace_id is not None
        self.ids.namespace_id = namespace_id
        existing = {s["Name"]: s["Arn"] for s in _discovery_services(self.aws, namespace_id)}
        for task in stack.services:
            if task.name in existing:
                self.ids.registry_arns[task.name] = existing[task.name]
                self.report.add("cloudmap-service", f"{task.name}.{stack.namespace}", "unchanged")
                continue
            self.ids.registry_arns[task.name] = sd.create_service(
                Name=task.name, NamespaceId=namespace_id, CreatorRequestId=f"{stack.name}-{task.name}",
                DnsConfig={"RoutingPolicy": "MULTIVALUE", "DnsRecords": [{"Type": "A", "TTL": 10}]},
                HealthCheckCustomConfig={"FailureThreshold": 1}, Tags=_kv_tags(stack),
            )["Service"]["Arn"]
            self.report.add("cloudmap-service", f"{task.name}.{stack.namespace}", "create")

    # -- load balancer ---------------------------------------------------------------------
    def _load_balancer(self) -> None:
        elb, stack = self.aws.elbv2, self.stack
        lb = find_load_balancer(self.aws, stack)
        if lb is None:
            lb = elb.create_load_balancer(
                Name=stack.load_balancer, Subnets=self._subnets(public=True),
                SecurityGroups=[self.ids.group_ids[f"{stack.name}-alb"]], Scheme="internet-facing",
                Type="application", IpAddressType="ipv4", Tags=_kv_tags(stack),
            )["LoadBalancers"][0]
            self.report.add("load-balancer", stack.load_balancer, "create")
        else:
            self.report.add("load-balancer", stack.load_balancer, "unchanged")
        self.ids.load_balancer_arn, self.ids.load_balancer_dns = lb["LoadBalancerArn"], lb["DNSName"]

        for tg in stack.target_groups:
            found = find_target_group(self.aws, tg.name)
            if found is None:
                arn = elb.create_target_group(
                    Name=tg.name, Protocol="HTTP", Port=tg.port, VpcId=self.ids.vpc_id, TargetType="ip",
                    HealthCheckProtocol="HTTP", HealthCheckPath=tg.health_path, Matcher={"HttpCode": "200"},
                    HealthCheckIntervalSeconds=15, HealthyThresholdCount=2, Tags=_kv_tags(stack),
                )["TargetGroups"][0]["TargetGroupArn"]
                self.report.add("target-group", tg.name, "create")
            elif found["Port"] != tg.port:
                raise InfraError(f"target group {tg.name} listens on {found['Port']}, not {tg.port}: destroy it first")
            elif found.get("HealthCheckPath") != tg.health_path:
                arn = found["TargetGroupArn"]
                elb.modify_target_group(TargetGroupArn=arn, HealthCheckPath=tg.health_path)
                self.report.add("target-group", tg.name, "update")
            else:
                arn = found["TargetGroupArn"]
                self.report.add("target-group", tg.name, "unchanged")
            self.ids.target_group_arns[tg.service] = arn

        default = next(tg for tg in stack.target_groups if tg.paths is None)
        forward = [{"Type": "forward", "TargetGroupArn": self.ids.target_group_arns[default.service]}]
        redirect = [{"Type": "redirect", "RedirectConfig": {"Protocol": "HTTPS", "Port": str(HTTPS_PORT),
                                                             "StatusCode": "HTTP_301"}}]
        existing = {li["Port"]: li for li in elb.describe_listeners(LoadBalancerArn=lb["LoadBalancerArn"])[
            "Listeners"]}
        listener_arn = ""
        for listener in stack.listeners:
            actions = redirect if listener.redirect_to_https else forward
            certificates = [{"CertificateArn": listener.certificate_arn}] if listener.certificate_arn else []
            label = f"{stack.load_balancer}:{listener.port}"
            current = existing.pop(listener.port, None)
            if current is None:
                arn = elb.create_listener(
                    LoadBalancerArn=lb["LoadBalancerArn"], Protocol=listener.protocol, Port=listener.port,
                    DefaultActions=actions, Tags=_kv_tags(stack),
                    **({"Certificates": certificates, "SslPolicy": TLS_POLICY} if certificates else {}),
                )["Listeners"][0]["ListenerArn"]
                self.report.add("listener", label, "create")
            else:
                arn = current["ListenerArn"]
                if (current["Protocol"] != listener.protocol
                        or _action_key(current["DefaultActions"]) != _action_key(actions)
                        or [c["CertificateArn"] for c in current.get("Certificates", [])]
                        != [c["CertificateArn"] for c in certificates]):
                    elb.modify_listener(ListenerArn=arn, Protocol=listener.protocol, DefaultActions=actions,
                                        **({"Certificates": certificates, "SslPolicy": TLS_POLICY}
                                           if certificates else {}))
                    self.report.add("listener", label, "update")
                else:
                    self.report.add("listener", label, "unchanged")
            if not listener.redirect_to_https:
                listener_arn = arn
        for port, leftover in existing.items():  # e.g. HTTPS was switched off
            elb.delete_listener(ListenerArn=leftover["ListenerArn"])
            self.report.add("listener", f"{stack.load_balancer}:{port}", "delete")

        rules = {r["Priority"]: r for r in elb.describe_rules(ListenerArn=listener_arn)["Rules"]}
        for tg in stack.target_groups:
            if tg.paths is None:
                continue
            conditions = [{"Field": "path-pattern", "PathPatternConfig": {"Values": list(tg.paths)}}]
            actions = [{"Type": "forward", "TargetGroupArn": self.ids.target_group_arns[tg.service]}]
            rule = rules.get(str(tg.priority))
            label = f"{stack.load_balancer} {' '.join(tg.paths)} -> {tg.service}"
            if rule is None:
                elb.create_rule(ListenerArn=listener_arn, Priority=tg.priority, Conditions=conditions,
                                Actions=actions, Tags=_kv_tags(stack))
                self.report.add("listener-rule", label, "create")
            elif _rule_paths(rule) != list(tg.paths) or _rule_target(rule) != actions[0]["TargetGroupArn"]:
                elb.modify_rule(RuleArn=rule["RuleArn"], Conditions=conditions, Actions=actions)
                self.report.add("listener-rule", label, "update")
            else:
                self.report.add("listener-rule", label, "unchanged")

    # -- ECS services ----------------------------------------------------------------------
    def _services(self) -> None:
        ecs, stack = self.aws.ecs, self.stack
        current = {s["serviceName"]: s for s in describe_services(self.aws, stack) if s["status"] != "INACTIVE"}
        for task in stack.services:  # dependency order
            arn = self.ids.task_definition_arns[task.name]
            service = current.get(task.name)
            if service is None:
                kwargs: dict[str, Any] = {}
                if task.public:
                    kwargs["loadBalancers"] = [{"targetGroupArn": self.ids.target_group_arns[task.name],
                                                "containerName": task.name, "containerPort": task.port}]
                    kwargs["healthCheckGracePeriodSeconds"] = HEALTH_GRACE_S
                ecs.create_service(
                    cluster=stack.cluster, serviceName=task.name, taskDefinition=arn,
                    desiredCount=stack.desired_count, launchType="FARGATE",
                    networkConfiguration=self._network_configuration(),
                    serviceRegistries=[{"registryArn": self.ids.registry_arns[task.name]}],
                    deploymentConfiguration={"deploymentCircuitBreaker": {"enable": True, "rollback": True},
                                             "minimumHealthyPercent": 100, "maximumPercent": 200},
                    propagateTags="SERVICE", enableECSManagedTags=True, tags=_ecs_tags(stack), **kwargs,
                )
                self.report.add("ecs-service", task.name, "create")
            elif service["taskDefinition"] != arn or service["desiredCount"] != stack.desired_count:
                ecs.update_service(cluster=stack.cluster, service=task.name, taskDefinition=arn,
                                   desiredCount=stack.desired_count)
                self.report.add("ecs-service", task.name, "update")
            else:
                self.report.add("ecs-service", task.name, "unchanged")

    def _wait_steady(self) -> None:
        stack = self.stack
        names = [t.name for t in stack.services]
        pending: list[str] = list(names)

        def steady() -> bool:
            described = {s["serviceName"]: s for s in describe_services(self.aws, stack)}
            pending[:] = [
                name for name in names
                if not (name in described
                        and described[name]["runningCount"] >= described[name]["desiredCount"]
                        and len(described[name].get("deployments", [])) <= 1)
            ]
            return not pending

        try:
            self.wait(f"{len(names)} ECS services to reach steady state", steady)
        except TimeoutError as exc:
            raise InfraError(f"services not steady in time: {', '.join(pending)} ({exc})") from exc


def _permission_keys(permissions: list[dict[str, Any]]) -> set[tuple[str, int, int, str]]:
    keys = set()
    for perm in permissions:
        proto, start, end = perm.get("IpProtocol"), perm.get("FromPort"), perm.get("ToPort")
        for pair in perm.get("UserIdGroupPairs", []):
            keys.add((proto, start, end, pair["GroupId"]))
        for rng in perm.get("IpRanges", []):
            keys.add((proto, start, end, rng["CidrIp"]))
    return keys  # type: ignore[return-value]


def _permissions(keys: set[tuple[str, int, int, str]]) -> list[dict[str, Any]]:
    result = []
    for proto, start, end, source in sorted(keys):
        perm: dict[str, Any] = {"IpProtocol": proto, "FromPort": start, "ToPort": end}
        if source.startswith("sg-"):
            perm["UserIdGroupPairs"] = [{"GroupId": source}]
        else:
            perm["IpRanges"] = [{"CidrIp": source}]
        result.append(perm)
    return result


def _action_key(actions: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """What a listener's default actions do, ignoring the fields AWS fills in."""
    key = []
    for action in actions:
        if action["Type"] == "redirect":
            config = action.get("RedirectConfig", {})
            key.append(("redirect", f"{config.get('Protocol')}:{config.get('Port')}"))
        else:
            key.append((action["Type"], str(action.get("TargetGroupArn"))))
    return key


def _rule_paths(rule: dict[str, Any]) -> list[str]:
    for condition in rule.get("Conditions", []):
        if condition.get("Field") == "path-pattern":
            return list(condition.get("PathPatternConfig", {}).get("Values") or condition.get("Values", []))
    return []


def _rule_target(rule: dict[str, Any]) -> str | None:
    actions = rule.get("Actions", [])
    return actions[0].get("TargetGroupArn") if actions else None


# ---------------------------------------------------------------------------------------
# lookups shared by deploy, status and destroy
# ---------------------------------------------------------------------------------------


def find_vpc(aws: Clients, stack: Stack) -> str | None:
    vpcs = aws.ec2.describe_vpcs(Filters=[{"Name": f"tag:{STACK_TAG}", "Values": [stack.name]}])["Vpcs"]
    return vpcs[0]["VpcId"] if vpcs else None


def find_namespace(aws: Clients, stack: Stack) -> str | None:
    paginator = aws.servicediscovery.get_paginator("list_namespaces")
    for page in paginator.paginate():
        for namespace in page["Namespaces"]:
            if namespace["Name"] == stack.namespace:
                return str(namespace["Id"])
    return None


def _discovery_services(aws: Clients, namespace_id: str) -> list[dict[str, Any]]:
    filters = [{"Name": "NAMESPACE_ID", "Values": [namespace_id], "Condition": "EQ"}]
    services: list[dict[str, Any]] = []
    for page in aws.servicediscovery.get_paginator("list_services").paginate(Filters=filters):
        for summary in page["Services"]:
            # Trust no filter with deletes at stake (moto ignores this one): check the namespace itself.
            owner = aws.servicediscovery.get_service(Id=summary["Id"])["Service"].get("NamespaceId")
            if owner == namespace_id:
                services.append(summary)
    return services


def find_load_balancer(aws: Clients, stack: Stack) -> dict[str, Any] | None:
    try:
        return dict(aws.elbv2.describe_load_balancers(Names=[stack.load_balancer])["LoadBalancers"][0])
    except ClientError as exc:
        if _code(exc) == "LoadBalancerNotFound":
            return None
        raise


def find_target_group(aws: Clients, name: str) -> dict[str, Any] | None:
    try:
        return dict(aws.elbv2.describe_target_groups(Names=[name])["TargetGroups"][0])
    except ClientError as exc:
        if _code(exc) == "TargetGroupNotFound":
            return None
        raise


def cluster_active(aws: Clients, stack: Stack) -> bool:
    clusters = aws.ecs.describe_clusters(clusters=[stack.cluster])["clusters"]
    return any(c["status"] == "ACTIVE" for c in clusters)


def describe_services(aws: Clients, stack: Stack) -> list[dict[str, Any]]:
    if not cluster_active(aws, stack):
        return []
    names = [t.name for t in stack.services]
    found: list[dict[str, Any]] = []
    for start in range(0, len(names), 10):  # the API takes at most 10 names per call
        found.extend(aws.ecs.describe_services(cluster=stack.cluster, services=names[start:start + 10])["services"])
    return found


# ---------------------------------------------------------------------------------------
# status
# ---------------------------------------------------------------------------------------


@dataclass
class ServiceState:
    name: str
    desired: int
    running: int
    task_definition: str
    status: str


#: Resource states that serve traffic; anything else (``missing``, ``creating``, ``provisioning``,
#: ``failed``, ``stopped`` ...) makes ``pms infra status`` report the stack as unhealthy.
_SERVING_STATES = {
    "db-instance": {"available", "backing-up", "modifying", "storage-optimization"},
    "load-balancer": {"active"},
}


@dataclass
class StackStatus:
    exists: bool
    resources: list[tuple[str, str, str]] = field(default_factory=list)  # (kind, name, state)
    services: list[ServiceState] = field(default_factory=list)
    load_balancer_dns: str | None = None
    #: ECS services the desired stack has, and the task count it asks of each.
    expected_services: list[str] = field(default_factory=list)
    desired_count: int | None = None

    @property
    def problems(self) -> list[str]:
        """Why the stack is not healthy, one line each (empty when it is)."""
        if not self.exists:
            return ["the stack is not deployed"]
        found: list[str] = []
        for kind, name, state in self.resources:
            if state == "missing":
                found.append(f"{kind} {name} is missing")
            elif kind in _SERVING_STATES and state not in _SERVING_STATES[kind]:
                found.append(f"{kind} {name} is {state}")
        by_name = {s.name: s for s in self.services}
        for name in self.expected_services:
            svc = by_name.get(name)
            if svc is None or svc.status == "INACTIVE":
                found.append(f"ecs-service {name} is missing")
                continue
            if svc.status != "ACTIVE":
                found.append(f"ecs-service {name} is {svc.status}")
            if svc.running < svc.desired:
                found.append(f"ecs-service {name} runs {svc.running} of {svc.desired} task(s)")
            if self.desired_count is not None and svc.desired != self.desired_count:
                found.append(f"ecs-service {name} wants {svc.desired} task(s), the stack {self.desired_count} "
                             "(`pms infra deploy` repairs it)")
        if not self.expected_services and not self.services:
            found.append("no ECS services")
        return found

    @property
    def healthy(self) -> bool:
        return not self.problems


def status(stack: Stack, aws: Clients) -> StackStatus:
    """Read the stack's state: what exists, how each service runs, the load balancer address."""
    result = StackStatus(exists=False, expected_services=[t.name for t in stack.services],
                         desired_count=stack.desired_count)
    vpc = find_vpc(aws, stack)
    result.resources.append(("vpc", stack.name, vpc or "missing"))
    try:
        db = aws.rds.describe_db_instances(DBInstanceIdentifier=stack.database.identifier)["DBInstances"][0]
        result.resources.append(("db-instance", stack.database.identifier, db["DBInstanceStatus"]))
    except ClientError as exc:
        if _code(exc) != "DBInstanceNotFound":
            raise
        result.resources.append(("db-instance", stack.database.identifier, "missing"))
    result.resources.append(("ecs-cluster", stack.cluster, "ACTIVE" if cluster_active(aws, stack) else "missing"))
    namespace = find_namespace(aws, stack)
    result.resources.append(("cloudmap-namespace", stack.namespace, namespace or "missing"))
    lb = find_load_balancer(aws, stack)
    if lb is not None:
        result.load_balancer_dns = lb["DNSName"]
        result.resources.append(("load-balancer", stack.load_balancer, lb.get("State", {}).get("Code", "unknown")))
    else:
        result.resources.append(("load-balancer", stack.load_balancer, "missing"))
    for svc in describe_services(aws, stack):
        result.services.append(ServiceState(
            name=svc["serviceName"], desired=svc["desiredCount"], running=svc["runningCount"],
            task_definition=svc["taskDefinition"].rsplit("/", 1)[-1], status=svc["status"],
        ))
    result.exists = any(state != "missing" for _, _, state in result.resources)
    return result


# ---------------------------------------------------------------------------------------
# destroy
# ---------------------------------------------------------------------------------------


class Destroyer:
    """Deletes everything the stack owns, in reverse order of creation; safe to rerun."""

    def __init__(self, stack: Stack, clients: Clients, *, report: Report, wait: Waiter) -> None:
        self.stack = stack
        self.aws = clients
        self.report = report
        self.wait = wait

    def destroy(self) -> None:
        self._services()
        self._task_definitions()
        self._cluster()
        self._load_balancer()
        self._service_discovery()
        self._database()
        self._secrets()
        self._log_groups()
        self._execution_role()
        self._network()

    def _services(self) -> None:
        ecs, stack = self.aws.ecs, self.stack
        if not cluster_active(self.aws, stack):
            return
        for svc in describe_services(self.aws, stack):
            if svc["status"] == "INACTIVE":
                continue
            ecs.update_service(cluster=stack.cluster, service=svc["serviceName"], desiredCount=0)
            ecs.delete_service(cluster=stack.cluster, service=svc["serviceName"], force=True)
            self.report.add("ecs-service", svc["serviceName"], "delete")
        running = ecs.list_tasks(cluster=stack.cluster)["taskArns"]
        for task_arn in running:
            ecs.stop_task(cluster=stack.cluster, task=task_arn, reason="pms infra destroy")
        self.wait("ECS services to drain", lambda: all(
            s["status"] == "INACTIVE" for s in describe_services(self.aws, stack)
        ))

    def _task_definitions(self) -> None:
        ecs = self.aws.ecs
        for task in self.stack.tasks:
            arns: list[str] = []
            for page in ecs.get_paginator("list_task_definitions").paginate(familyPrefix=task.family,
                                                                            status="ACTIVE"):
                arns.extend(a for a in page["taskDefinitionArns"] if a.rsplit("/", 1)[-1].rsplit(":", 1)[0]
                            == task.family)
            for arn in arns:
                ecs.deregister_task_definition(taskDefinition=arn)
            if arns:
                try:
                    ecs.delete_task_definitions(taskDefinitions=arns)
                except (ClientError, AttributeError):  # older endpoints: deregistered is as far as it goes
                    pass
                self.report.add("task-definition", task.family, "delete")

    def _cluster(self) -> None:
        if cluster_active(self.aws, self.stack):
            self.aws.ecs.delete_cluster(cluster=self.stack.cluster)
            self.report.add("ecs-cluster", self.stack.cluster, "delete")

    def _load_balancer(self) -> None:
        elb, stack = self.aws.elbv2, self.stack
        lb = find_load_balancer(self.aws, stack)
        if lb is not None:
            for listener in elb.describe_listeners(LoadBalancerArn=lb["LoadBalancerArn"])["Listeners"]:
                elb.delete_listener(ListenerArn=listener["ListenerArn"])
            elb.delete_load_balancer(LoadBalancerArn=lb["LoadBalancerArn"])
            self.wait("the load balancer to be deleted", lambda: find_load_balancer(self.aws, stack) is None)
            self.report.add("load-balancer", stack.load_balancer, "delete")
        for tg in stack.target_groups:
            found = find_target_group(self.aws, tg.name)
            if found is not None:
                elb.delete_target_group(TargetGroupArn=found["TargetGroupArn"])
                self.report.add("target-group", tg.name, "delete")

    def _service_discovery(self) -> None:
        sd, stack = self.aws.servicediscovery, self.stack
        namespace_id = find_namespace(self.aws, stack)
        if namespace_id is None:
            return
        for service in _discovery_services(self.aws, namespace_id):
            for instance in sd.list_instances(ServiceId=service["Id"]).get("Instances", []):
                sd.deregister_instance(ServiceId=service["Id"], InstanceId=instance["Id"])
            sd.delete_service(Id=service["Id"])
            self.report.add("cloudmap-service", f"{service['Name']}.{stack.namespace}", "delete")
        sd.delete_namespace(Id=namespace_id)
        self.wait(f"Cloud Map namespace {stack.namespace} to be deleted",
                  lambda: find_namespace(self.aws, stack) is None)
        self.report.add("cloudmap-namespace", stack.namespace, "delete")

    def _database(self) -> None:
        rds, db = self.aws.rds, self.stack.database

        def gone() -> bool:
            try:
                rds.describe_db_instances(DBInstanceIdentifier=db.identifier)
            except ClientError as exc:
                if _code(exc) == "DBInstanceNotFound":
                    return True
                raise
            return False

        if not gone():
            # Deliberately no final snapshot: destroy leaves nothing. Take `pms backup` first.
            rds.delete_db_instance(DBInstanceIdentifier=db.identifier, SkipFinalSnapshot=True,
                                   DeleteAutomatedBackups=True)
            self.wait(f"RDS {db.identifier} to be deleted", gone)
            self.report.add("db-instance", db.identifier, "delete")
        try:
            rds.delete_db_subnet_group(DBSubnetGroupName=db.subnet_group)
            self.report.add("db-subnet-group", db.subnet_group, "delete")
        except ClientError as exc:
            if _code(exc) != "DBSubnetGroupNotFoundFault":
                raise

    def _secrets(self) -> None:
        sm = self.aws.secretsmanager
        for spec in self.stack.secrets:
            try:
                sm.describe_secret(SecretId=spec.name)
            except ClientError as exc:
                if _code(exc) == "ResourceNotFoundException":
                    continue
                raise
            # No recovery window: destroy leaves nothing, and a redeploy may reuse the names at once.
            sm.delete_secret(SecretId=spec.name, ForceDeleteWithoutRecovery=True)
            self.report.add("secret", spec.name, "delete")

    def _log_groups(self) -> None:
        logs = self.aws.logs
        for name in self.stack.log_groups():
            try:
                logs.delete_log_group(logGroupName=name)
                self.report.add("log-group", name, "delete")
            except ClientError as exc:
                if _code(exc) != "ResourceNotFoundException":
                    raise

    def _execution_role(self) -> None:
        iam, name = self.aws.iam, self.stack.execution_role
        try:
            iam.get_role(RoleName=name)
        except ClientError as exc:
            if _code(exc) == "NoSuchEntity":
                return
            raise
        for policy in iam.list_attached_role_policies(RoleName=name)["AttachedPolicies"]:
            iam.detach_role_policy(RoleName=name, PolicyArn=policy["PolicyArn"])
        for policy_name in iam.list_role_policies(RoleName=name)["PolicyNames"]:
            iam.delete_role_policy(RoleName=name, PolicyName=policy_name)
        iam.delete_role(RoleName=name)
        self.report.add("iam-role", name, "delete")

    def _until_deleted(self, label: str, action: Callable[[], object]) -> None:
        """Retry ``action`` while AWS still sees a dependency (ENIs of stopped tasks, the ALB, RDS
        linger for minutes after those are deleted); any other error is raised at once."""

        def attempt() -> bool:
            try:
                action()
            except ClientError as exc:
                if _code(exc) == "DependencyViolation":
                    return False
                raise
            return True

        self.wait(label, attempt)

    def _network(self) -> None:
        ec2, stack = self.aws.ec2, self.stack
        vpc_id = find_vpc(self.aws, stack)
        if vpc_id is None:
            return
        vpc_filter = [{"Name": "vpc-id", "Values": [vpc_id]}]
        groups = [g for g in ec2.describe_security_groups(Filters=vpc_filter)["SecurityGroups"]
                  if g["GroupName"] != "default"]
        # Groups reference each other: drop every rule first, then the groups.
        for group in groups:
            if group.get("IpPermissions"):
                ec2.revoke_security_group_ingress(GroupId=group["GroupId"], IpPermissions=group["IpPermissions"])
        for group in groups:
            self._until_deleted(f"security group {group['GroupName']} to be free",
                                functools.partial(ec2.delete_security_group, GroupId=group["GroupId"]))
            self.report.add("security-group", group["GroupName"], "delete")
        for table in ec2.describe_route_tables(Filters=vpc_filter)["RouteTables"]:
            if any(a.get("Main") for a in table.get("Associations", [])):
                continue
            for association in table.get("Associations", []):
                ec2.disassociate_route_table(AssociationId=association["RouteTableAssociationId"])
            ec2.delete_route_table(RouteTableId=table["RouteTableId"])
            self.report.add("route-table", table["RouteTableId"], "delete")
        for subnet in ec2.describe_subnets(Filters=vpc_filter)["Subnets"]:
            self._until_deleted(f"subnet {subnet['SubnetId']} to be free",
                                functools.partial(ec2.delete_subnet, SubnetId=subnet["SubnetId"]))
            name = next((t["Value"] for t in subnet.get("Tags", []) if t["Key"] == "Name"), subnet["SubnetId"])
            self.report.add("subnet", name, "delete")
        gateways = ec2.describe_internet_gateways(
            Filters=[{"Name": "attachment.vpc-id", "Values": [vpc_id]}]
        )["InternetGateways"]
        for gateway in gateways:
            self._until_deleted("the internet gateway to detach", functools.partial(
                ec2.detach_internet_gateway, InternetGatewayId=gateway["InternetGatewayId"], VpcId=vpc_id))
            ec2.delete_internet_gateway(InternetGatewayId=gateway["InternetGatewayId"])
            self.report.add("internet-gateway", stack.name, "delete")
        self._until_deleted(f"VPC {vpc_id} to be free", functools.partial(ec2.delete_vpc, VpcId=vpc_id))
        self.report.add("vpc", stack.name, "delete")


def polling_waiter(*, timeout: float, interval: float,
                   on_wait: Callable[[str], None] | None = None) -> Waiter:
    """A :data:`Waiter` that polls with :func:`pms.process.wait_until` under one deadline each."""

    def wait(label: str, condition: Callable[[], bool]) -> None:
        if on_wait is not None:
            on_wait(label)
        process.wait_until(condition, timeout=timeout, interval=interval, message=label)

    return wait
