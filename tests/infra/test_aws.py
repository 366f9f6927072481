"""Deploy the whole stack to a moto server and check every resource and its wiring.

One stack (``pms``) is deployed once per module and inspected by most tests; tests that
change it put it back. Destroy and failure paths use stacks of their own in the same
account, which also shows that stacks do not touch each other.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import boto3
import pytest
from rich.console import Console

from infra import aws
from infra import cli as infra_cli
from infra.stack import STACK_TAG, Stack, desired_stack
from pms.registry import SERVICES
from pms.settings import Settings
from tests.infra.conftest import IMAGE, KAFKA, REGION, output

pytestmark = pytest.mark.integration


@dataclass
class Deployment:
    settings: Settings
    stack: Stack
    aws: aws.Clients
    endpoint: str
    report: aws.Report


@pytest.fixture(scope="module")
def deployed(moto_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    settings = Settings(_env_file=None, data_dir=tmp_path_factory.mktemp("infra"),  # type: ignore[call-arg]
                        kafka_bootstrap_servers=KAFKA,
                        infra={"stack_name": "pms", "region": REGION, "image": IMAGE, "poll_interval_s": 0.01,
                               "wait_timeout_s": 20.0})
    report = infra_cli.deploy(settings, endpoint_url=moto_endpoint, console=Console(file=io.StringIO()))
    yield Deployment(settings, desired_stack(settings), aws.Clients.connect(REGION, moto_endpoint), moto_endpoint,
                     report)


def _task_definition(d: Deployment, name: str) -> dict[str, Any]:
    return d.aws.ecs.describe_task_definition(taskDefinition=f"{d.stack.name}-{name}")["taskDefinition"]


def _secret_arns(d: Deployment) -> dict[str, str]:
    return {s.key: d.aws.secretsmanager.describe_secret(SecretId=s.name)["ARN"] for s in d.stack.secrets}


def _ecs_service(d: Deployment, name: str) -> dict[str, Any]:
    return d.aws.ecs.describe_services(cluster=d.stack.cluster, services=[name])["services"][0]


def _vpc_id(d: Deployment) -> str:
    vpc = aws.find_vpc(d.aws, d.stack)
    assert vpc is not None
    return vpc


# -- first deploy ------------------------------------------------------------------------------


def test_first_deploy_creates_everything(deployed: Deployment) -> None:
    actions = {c.action for c in deployed.report.changes}
    assert actions <= {"create", "run"}
    kinds = {c.resource for c in deployed.report.changes}
    assert {"vpc", "subnet", "security-group", "log-group", "secret", "iam-role", "db-instance", "ecs-cluster",
            "task-definition", "db-init", "cloudmap-namespace", "cloudmap-service", "load-balancer",
            "target-group", "listener", "listener-rule", "ecs-service"} <= kinds


def test_network_has_public_and_private_subnets_in_two_zones(deployed: Deployment) -> None:
    ec2 = deployed.aws.ec2
    vpc_id = _vpc_id(deployed)
    vpc = ec2.describe_vpcs(VpcIds=[vpc_id])["Vpcs"][0]
    assert vpc["CidrBlock"] == deployed.settings.infra.vpc_cidr
    subnets = ec2.describe_subnets(Filters=[{"Name": "vpc-id", "Values": [vpc_id]}])["Subnets"]
    by_tag = {next(t["Value"] for t in s["Tags"] if t["Key"] == "Name"): s for s in subnets}
    assert set(by_tag) == {"pms-public-a", "pms-public-b", "pms-private-a", "pms-private-b"}
    assert by_tag["pms-public-a"]["AvailabilityZone"] != by_tag["pms-public-b"]["AvailabilityZone"]
    assert by_tag["pms-public-a"]["MapPublicIpOnLaunch"] and not by_tag["pms-private-a"]["MapPublicIpOnLaunch"]
    igws = ec2.describe_internet_gateways(Filters=[{"Name": "attachment.vpc-id", "Values": [vpc_id]}])
    assert len(igws["InternetGateways"]) == 1
    table = ec2.describe_route_tables(Filters=[{"Name": "tag:Name", "Values": ["pms-public"]}])["RouteTables"][0]
    assert {a["SubnetId"] for a in table["Associations"]} == {
        by_tag["pms-public-a"]["SubnetId"], by_tag["pms-public-b"]["SubnetId"]}
    assert any(r.get("DestinationCidrBlock") == "0.0.0.0/0" and r.get("GatewayId", "").startswith("igw-")
               for r in table["Routes"])


def test_security_groups_chain_world_to_alb_to_services_to_db(deployed: Deployment) -> None:
    groups = {g["GroupName"]: g for g in deployed.aws.ec2.describe_security_groups(
        Filters=[{"Name": "vpc-id", "Values": [_vpc_id(deployed)]}])["SecurityGroups"]}
    alb, services, db = groups["pms-alb"], groups["pms-services"], groups["pms-db"]

    def rules(group: dict[str, Any]) -> set[tuple[int, int, str]]:
        return {(p["FromPort"], p["ToPort"], src) for p in group["IpPermissions"]
                for src in [*(g["GroupId"] for g in p.get("UserIdGroupPairs", [])),
                            *(r["CidrIp"] for r in p.get("IpRanges", []))]}

    assert rules(alb) == {(80, 80, "0.0.0.0/0")}
    assert rules(db) == {(5432, 5432, services["GroupId"])}
    svc_rules = rules(services)
    assert (4004, 4004, alb["GroupId"]) in svc_rules and (8501, 8501, alb["GroupId"]) in svc_rules
    assert not any(src == "0.0.0.0/0" for *_, src in svc_rules)
    ports = [int(Settings.model_fields[s.section].default.port) for s in SERVICES]
    ports.append(Settings.model_fields["billing"].default.metrics_port)  # Prometheus scrapes billing there
    assert (min(ports), max(ports), services["GroupId"]) in svc_rules


def test_database_is_private_encrypted_and_initialised(deployed: Deployment) -> None:
    rds = deployed.aws.rds
    db = rds.describe_db_instances(DBInstanceIdentifier="pms-postgres")["DBInstances"][0]
    assert db["Engine"] == "postgres"
    assert db["DBInstanceClass"] == deployed.settings.infra.db_instance_class
    assert db["PubliclyAccessible"] is False
    assert db["StorageEncrypted"] is True
    assert db["DBSubnetGroup"]["DBSubnetGroupName"] == "pms-db"
    private = {s["SubnetId"] for s in deployed.aws.ec2.describe_subnets(
        Filters=[{"Name": "tag:Name", "Values": ["pms-private-a", "pms-private-b"]}])["Subnets"]}
    assert {s["SubnetIdentifier"] for s in db["DBSubnetGroup"]["Subnets"]} == private
    db_group = deployed.aws.ec2.describe_security_groups(
        Filters=[{"Name": "group-name", "Values": ["pms-db"]}])["SecurityGroups"][0]["GroupId"]
    assert [g["VpcSecurityGroupId"] for g in db["VpcSecurityGroups"]] == [db_group]
    tags = rds.list_tags_for_resource(ResourceName=db["DBInstanceArn"])["TagList"]
    assert {"Key": aws.DB_INITIALISED_TAG, "Value": "true"} in tags
    master = deployed.aws.secretsmanager.get_secret_value(SecretId="pms/db-master-password")["SecretString"]
    url = deployed.aws.secretsmanager.get_secret_value(SecretId="pms/db-master-url")["SecretString"]
    assert url == f"postgresql://pms_master:{master}@{db['Endpoint']['Address']}:{db['Endpoint']['Port']}/postgres"


def test_secrets_are_generated_and_urls_point_at_rds(deployed: Deployment) -> None:
    sm = deployed.aws.secretsmanager
    value = {s.key: sm.get_secret_value(SecretId=s.name)["SecretString"] for s in deployed.stack.secrets}
    assert len(value["jwt-secret"]) == 64 and len(set(value.values())) == len(value)
    endpoint = deployed.aws.rds.describe_db_instances(DBInstanceIdentifier="pms-postgres")["DBInstances"][0]
    host = endpoint["Endpoint"]["Address"]
    assert value["database-url"] == f"postgresql+psycopg://pms:{value['db-app-password']}@{host}:5432/postgres"
    assert value["analyst-database-url"] == (
        f"postgresql+psycopg://pms_analyst:{value['db-analyst-password']}@{host}:5432/analytics")
    tags = sm.describe_secret(SecretId="pms/jwt-secret")["Tags"]
    assert {"Key": STACK_TAG, "Value": "pms"} in tags


def test_execution_role_reads_only_this_stacks_secrets(deployed: Deployment) -> None:
    iam = deployed.aws.iam
    role = iam.get_role(RoleName="pms-task-execution")["Role"]
    trust = role["AssumeRolePolicyDocument"]
    trust = json.loads(trust) if isinstance(trust, str) else trust
    assert trust["Statement"][0]["Principal"] == {"Service": "ecs-tasks.amazonaws.com"}
    attached = [p["PolicyArn"] for p in iam.list_attached_role_policies(RoleName="pms-task-execution")[
        "AttachedPolicies"]]
    assert attached == [aws.EXECUTION_POLICY_ARN]
    policy = iam.get_role_policy(RoleName="pms-task-execution", PolicyName="read-stack-secrets")["PolicyDocument"]
    policy = json.loads(policy) if isinstance(policy, str) else policy
    (statement,) = policy["Statement"]
    assert statement["Action"] == ["secretsmanager:GetSecretValue"]
    assert len(statement["Resource"]) == 1 and statement["Resource"][0].endswith(":secret:pms/*")


def test_log_groups_per_task_with_retention(deployed: Deployment) -> None:
    groups = {g["logGroupName"]: g for g in deployed.aws.logs.describe_log_groups(logGroupNamePrefix="/pms/")[
        "logGroups"]}
    assert set(groups) == {f"/pms/{s.name}" for s in SERVICES} | {"/pms/db-init"}
    assert all(g["retentionInDays"] == deployed.settings.infra.log_retention_days for g in groups.values())


@pytest.mark.parametrize("spec", SERVICES, ids=lambda s: s.name)
def test_task_definition_wiring(deployed: Deployment, spec: Any) -> None:
    td = _task_definition(deployed, spec.name)
    role = deployed.aws.iam.get_role(RoleName="pms-task-execution")["Role"]["Arn"]
    assert td["requiresCompatibilities"] == ["FARGATE"] and td["networkMode"] == "awsvpc"
    assert td["executionRoleArn"] == role
    (container,) = td["containerDefinitions"]
    port = int(Settings.model_fields[spec.section].default.port)
    assert container["image"] == IMAGE
    assert container["command"] == ["serve", spec.name]
    assert "entryPoint" not in container  # the image's ENTRYPOINT is pms
    metrics = getattr(Settings.model_fields[spec.section].default, "metrics_port", 0)
    assert [(p["containerPort"], p["protocol"]) for p in container["portMappings"]] == [
        (port, "tcp"), *([(metrics, "tcp")] if metrics else [])]
    env = {e["name"]: e["value"] for e in container["environment"]}
    assert env[f"PMS_{spec.section.upper()}__HOST"] == "0.0.0.0"
    assert env[f"PMS_{spec.section.upper()}__PORT"] == str(port)
    assert env["PMS_KAFKA_BOOTSTRAP_SERVERS"] == KAFKA
    assert env["PMS_PATIENT__URL"] == "http://patient.pms.internal:4000"
    assert env["PMS_BILLING__TARGET"] == "billing.pms.internal:9001"
    arns = _secret_arns(deployed)
    assert {s["name"]: s["valueFrom"] for s in container["secrets"]} == {
        "PMS_JWT__SECRET": arns["jwt-secret"], "PMS_ADMIN_PASSWORD": arns["admin-password"],
        "PMS_DATABASE_URL": arns["database-url"], "PMS_ANALYST_DATABASE_URL": arns["analyst-database-url"]}
    assert container["logConfiguration"] == {"logDriver": "awslogs", "options": {
        "awslogs-group": f"/pms/{spec.name}", "awslogs-region": REGION, "awslogs-stream-prefix": spec.name}}
    assert container["healthCheck"]["command"] == ["CMD", "python", "-m", "infra.healthcheck", spec.name]


def test_no_secret_value_appears_in_any_task_definition(deployed: Deployment) -> None:
    sm = deployed.aws.secretsmanager
    values = [sm.get_secret_value(SecretId=s.name)["SecretString"] for s in deployed.stack.secrets]
    for task in deployed.stack.tasks:
        text = json.dumps(_task_definition(deployed, task.name))
        for value in values:
            assert value not in text, task.name
        for password_key in ("db-app-password", "db-master-password"):
            fragment = sm.get_secret_value(SecretId=f"pms/{password_key}")["SecretString"][:16]
            assert fragment not in text


def test_db_init_task_uses_master_login_and_bootstrap_module(deployed: Deployment) -> None:
    (container,) = _task_definition(deployed, "db-init")["containerDefinitions"]
    assert container["entryPoint"] == ["python", "-m", "infra.dbinit"]
    arns = _secret_arns(deployed)
    assert {s["name"]: s["valueFrom"] for s in container["secrets"]} == {
        "PMS_DBINIT_SUPERUSER_URL": arns["db-master-url"], "PMS_DB_APP_PASSWORD": arns["db-app-password"],
        "PMS_DB_ANALYST_PASSWORD": arns["db-analyst-password"]}
    assert "healthCheck" not in container
    assert "db-init" not in {s["serviceName"] for s in aws.describe_services(deployed.aws, deployed.stack)}


def test_cloud_map_names_every_service(deployed: Deployment) -> None:
    namespace = aws.find_namespace(deployed.aws, deployed.stack)
    assert namespace is not None
    ns = deployed.aws.servicediscovery.get_namespace(Id=namespace)["Namespace"]
    assert ns["Name"] == "pms.internal" and ns["Type"] == "DNS_PRIVATE"
    services = {s["Name"]: s for s in aws._discovery_services(deployed.aws, namespace)}
    assert set(services) == {s.name for s in SERVICES}
    for spec in SERVICES:
        ecs_service = _ecs_service(deployed, spec.name)
        assert ecs_service["serviceRegistries"] == [{"registryArn": services[spec.name]["Arn"]}]


def test_load_balancer_routes_api_to_gateway_and_the_rest_to_dashboard(deployed: Deployment) -> None:
    elb = deployed.aws.elbv2
    lb = aws.find_load_balancer(deployed.aws, deployed.stack)
    assert lb is not None and lb["Scheme"] == "internet-facing" and lb["Type"] == "application"
    alb_group = deployed.aws.ec2.describe_security_groups(
        Filters=[{"Name": "group-name", "Values": ["pms-alb"]}])["SecurityGroups"][0]["GroupId"]
    assert lb["SecurityGroups"] == [alb_group]
    gateway = aws.find_target_group(deployed.aws, "pms-gateway")
    dashboard = aws.find_target_group(deployed.aws, "pms-dashboard")
    assert gateway is not None and dashboard is not None
    assert (gateway["Port"], gateway["TargetType"], gateway["HealthCheckPath"]) == (4004, "ip", "/ready")
    assert (dashboard["Port"], dashboard["HealthCheckPath"]) == (8501, "/_stcore/health")
    (listener,) = elb.describe_listeners(LoadBalancerArn=lb["LoadBalancerArn"])["Listeners"]
    assert listener["Port"] == 80
    assert listener["DefaultActions"][0]["TargetGroupArn"] == dashboard["TargetGroupArn"]
    rules = [r for r in elb.describe_rules(ListenerArn=listener["ListenerArn"])["Rules"] if not r["IsDefault"]]
    assert len(rules) == 1
    assert aws._rule_paths(rules[0]) == ["/api/*", "/auth/*", "/api-docs/*"]
    assert aws._rule_target(rules[0]) == gateway["TargetGroupArn"]
    for name, tg in (("gateway", gateway), ("dashboard", dashboard)):
        assert _ecs_service(deployed, name)["loadBalancers"] == [
            {"targetGroupArn": tg["TargetGroupArn"], "containerName": name, "containerPort": tg["Port"]}]


@pytest.mark.parametrize("spec", SERVICES, ids=lambda s: s.name)
def test_ecs_service_runs_its_latest_task_definition_on_fargate(deployed: Deployment, spec: Any) -> None:
    service = _ecs_service(deployed, spec.name)
    assert service["status"] == "ACTIVE" and service["launchType"] == "FARGATE"
    assert service["taskDefinition"] == _task_definition(deployed, spec.name)["taskDefinitionArn"]
    assert service["desiredCount"] == service["runningCount"] == deployed.settings.infra.desired_count
    network = service["networkConfiguration"]["awsvpcConfiguration"]
    services_group = deployed.aws.ec2.describe_security_groups(
        Filters=[{"Name": "group-name", "Values": ["pms-services"]}])["SecurityGroups"][0]["GroupId"]
    assert network["securityGroups"] == [services_group]
    if not spec.public:
        assert service["loadBalancers"] == []


# -- second deploy, drift, changes ----------------------------------------------------------------


def test_second_deploy_changes_nothing_and_says_so(deployed: Deployment, console: Console) -> None:
    jwt_before = deployed.aws.secretsmanager.get_secret_value(SecretId="pms/jwt-secret")["SecretString"]
    report = infra_cli.deploy(deployed.settings, endpoint_url=deployed.endpoint, console=console)
    assert report.changed == []
    assert len(report.changes) == len(deployed.report.changes)
    assert "No changes" in output(console)
    assert "pms-alb" in output(console)
    assert deployed.aws.secretsmanager.get_secret_value(SecretId="pms/jwt-secret")["SecretString"] == jwt_before


def test_new_image_updates_only_task_definitions_and_services(deployed: Deployment) -> None:
    newer = deployed.settings.model_copy(update={"infra": deployed.settings.infra.model_copy(
        update={"image": IMAGE.replace("1.4.2", "1.5.0")})})
    report = infra_cli.deploy(newer, endpoint_url=deployed.endpoint, console=Console(file=io.StringIO()))
    changed = {(c.resource, c.action) for c in report.changed}
    assert changed == {("task-definition", "update"), ("ecs-service", "update")}
    assert {c.name for c in report.changed if c.resource == "ecs-service"} == {s.name for s in SERVICES}
    container = _task_definition(deployed, "gateway")["containerDefinitions"][0]
    assert container["image"].endswith(":1.5.0")
    assert _ecs_service(deployed, "gateway")["taskDefinition"] == _task_definition(deployed, "gateway")[
        "taskDefinitionArn"]
    # And back: the stack is again what the module deployed.
    back = infra_cli.deploy(deployed.settings, endpoint_url=deployed.endpoint,
                            console=Console(file=io.StringIO()))
    assert {(c.resource, c.action) for c in back.changed} == {("task-definition", "update"),
                                                             ("ecs-service", "update")}


def test_deploy_repairs_drift(deployed: Deployment) -> None:
    ec2 = deployed.aws.ec2
    db_group = ec2.describe_security_groups(
        Filters=[{"Name": "group-name", "Values": ["pms-db"]}])["SecurityGroups"][0]
    ec2.revoke_security_group_ingress(GroupId=db_group["GroupId"], IpPermissions=db_group["IpPermissions"])
    ec2.authorize_security_group_ingress(GroupId=db_group["GroupId"], IpPermissions=[
        {"IpProtocol": "tcp", "FromPort": 5432, "ToPort": 5432, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}])
    deployed.aws.logs.put_retention_policy(logGroupName="/pms/gateway", retentionInDays=1)
    report = infra_cli.deploy(deployed.settings, endpoint_url=deployed.endpoint,
                              console=Console(file=io.StringIO()))
    assert {(c.resource, c.name, c.action) for c in report.changed} == {
        ("security-group", "pms-db", "update"), ("log-group", "/pms/gateway", "update")}
    repaired = ec2.describe_security_groups(GroupIds=[db_group["GroupId"]])["SecurityGroups"][0]
    assert aws._permission_keys(repaired["IpPermissions"]) == {
        ("tcp", 5432, 5432, ec2.describe_security_groups(Filters=[
            {"Name": "group-name", "Values": ["pms-services"]}])["SecurityGroups"][0]["GroupId"])}


def test_status_reports_services_and_load_balancer(deployed: Deployment, console: Console) -> None:
    result = infra_cli.status(deployed.settings, endpoint_url=deployed.endpoint, console=console)
    assert result.exists and result.healthy
    assert {s.name for s in result.services} == {s.name for s in SERVICES}
    assert result.load_balancer_dns and result.load_balancer_dns in output(console)
    assert "1/1" in output(console)


def _cli_status(endpoint: str, stack_name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> Any:
    """``pms infra status`` as a user runs it: settings from the environment, result as exit code + output."""
    from typer.testing import CliRunner

    from pms.cli import app
    from pms.settings import get_settings

    monkeypatch.chdir(tmp_path)  # no .env from the checkout
    for key, value in {"PMS_DATA_DIR": str(tmp_path), "PMS_KAFKA_BOOTSTRAP_SERVERS": KAFKA,
                       "PMS_INFRA__REGION": REGION, "PMS_INFRA__STACK_NAME": stack_name}.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    try:
        return CliRunner().invoke(app, ["infra", "status", "--endpoint-url", endpoint])
    finally:
        get_settings.cache_clear()


def test_pms_cli_runs_infra_status(deployed: Deployment, monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    result = _cli_status(deployed.endpoint, "pms", monkeypatch, tmp_path)
    assert result.exit_code == infra_cli.EXIT_HEALTHY, result.output
    assert "pms-alb" in result.output and "gateway" in result.output
    assert "is healthy" in result.output


def test_infra_status_exits_3_when_the_stack_is_not_deployed(
    moto_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    result = _cli_status(moto_endpoint, "never-deployed", monkeypatch, tmp_path)
    assert result.exit_code == infra_cli.EXIT_NOT_DEPLOYED, result.output
    assert "never-deployed is not deployed" in result.output


def test_infra_status_exits_1_on_a_stopped_database_and_a_scaled_down_service(
    deployed: Deployment, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """Drift that leaves the stack deployed but not serving is an unhealthy exit, naming each cause."""
    gateway = next(t.name for t in deployed.stack.services if t.name.endswith("gateway"))
    deployed.aws.ecs.update_service(cluster=deployed.stack.cluster, service=gateway, desiredCount=0)
    deployed.aws.rds.stop_db_instance(DBInstanceIdentifier=deployed.stack.database.identifier)
    try:
        result = _cli_status(deployed.endpoint, "pms", monkeypatch, tmp_path)
        assert result.exit_code == infra_cli.EXIT_UNHEALTHY, result.output
        assert "is not healthy (2 problem(s))" in result.output
        assert f"db-instance {deployed.stack.database.identifier} is stopped" in result.output
        assert f"ecs-service {gateway} wants 0 task(s), the stack 1" in result.output
    finally:
        deployed.aws.rds.start_db_instance(DBInstanceIdentifier=deployed.stack.database.identifier)
        infra_cli.deploy(deployed.settings, endpoint_url=deployed.endpoint, console=Console(file=io.StringIO()))
    assert aws.status(deployed.stack, deployed.aws).healthy


# -- failure paths -------------------------------------------------------------------------------


def test_deploy_without_kafka_address_fails_before_touching_aws(
    moto_endpoint: str, infra_settings: Callable[..., Settings], console: Console
) -> None:
    settings = infra_settings("nokafka").model_copy(update={"kafka_bootstrap_servers": None})
    with pytest.raises(SystemExit) as exit_info:
        infra_cli.deploy(settings, endpoint_url=moto_endpoint, console=console)
    assert exit_info.value.code == 1
    assert "PMS_KAFKA_BOOTSTRAP_SERVERS" in output(console)
    assert not infra_cli.status(settings.model_copy(update={"kafka_bootstrap_servers": KAFKA}),
                                endpoint_url=moto_endpoint, console=console).exists


@dataclass
class Stuck:
    settings: Settings
    exit_code: object
    text: str


@pytest.fixture(scope="module")
def stuck(moto_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stuck]:
    """A second stack, fully created, whose services never report a running task.

    Its deploy fails at the steady-state wait; the destroy test then removes it.
    """
    settings = Settings(_env_file=None, data_dir=tmp_path_factory.mktemp("stuck"),  # type: ignore[call-arg]
                        kafka_bootstrap_servers=KAFKA,
                        infra={"stack_name": "gone", "region": REGION, "image": IMAGE, "poll_interval_s": 0.01,
                               "wait_timeout_s": 0.3, "vpc_cidr": "10.81.0.0/16"})
    # It also serves HTTPS, so the TLS listener wiring is checked on a real (moto) certificate.
    acm = boto3.client("acm", region_name=REGION, endpoint_url=moto_endpoint,
                       aws_access_key_id="test", aws_secret_access_key="test")
    certificate = acm.request_certificate(DomainName="pms.example.org")["CertificateArn"]
    settings = settings.model_copy(update={"infra": settings.infra.model_copy(
        update={"certificate_arn": certificate})})
    console = Console(file=io.StringIO(), width=300)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOTO_ECS_SERVICE_RUNNING", "0")  # moto: services report no running task
        with pytest.raises(SystemExit) as exit_info:
            infra_cli.deploy(settings, endpoint_url=moto_endpoint, console=console)
    relaxed = settings.model_copy(update={"infra": settings.infra.model_copy(update={"wait_timeout_s": 20.0})})
    yield Stuck(relaxed, exit_info.value.code, output(console))
    infra_cli.destroy(relaxed, endpoint_url=moto_endpoint, console=Console(file=io.StringIO()))


def test_services_that_never_run_fail_the_deploy_with_their_names(stuck: Stuck, moto_endpoint: str) -> None:
    assert stuck.exit_code == 1
    assert "services not steady in time" in stuck.text
    assert all(s.name in stuck.text for s in SERVICES)
    state = aws.status(desired_stack(stuck.settings), aws.Clients.connect(REGION, moto_endpoint))
    assert state.exists and not state.healthy
    assert {s.running for s in state.services} == {0}


def test_infra_status_exits_1_for_services_without_running_tasks(
    stuck: Stuck, moto_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    result = _cli_status(moto_endpoint, "gone", monkeypatch, tmp_path)
    assert result.exit_code == infra_cli.EXIT_UNHEALTHY, result.output
    for task in desired_stack(stuck.settings).services:
        assert f"ecs-service {task.name} runs 0 of 1 task(s)" in result.output


def test_https_listener_forwards_and_http_redirects(stuck: Stuck, moto_endpoint: str) -> None:
    clients = aws.Clients.connect(REGION, moto_endpoint)
    stack = desired_stack(stuck.settings)
    lb = aws.find_load_balancer(clients, stack)
    assert lb is not None
    listeners = {li["Port"]: li for li in clients.elbv2.describe_listeners(
        LoadBalancerArn=lb["LoadBalancerArn"])["Listeners"]}
    assert set(listeners) == {80, 443}
    https, http = listeners[443], listeners[80]
    assert https["Protocol"] == "HTTPS" and https["SslPolicy"] == aws.TLS_POLICY
    assert [c["CertificateArn"] for c in https["Certificates"]] == [stuck.settings.infra.certificate_arn]
    dashboard = aws.find_target_group(clients, "gone-dashboard")
    assert dashboard is not None
    assert https["DefaultActions"][0]["TargetGroupArn"] == dashboard["TargetGroupArn"]
    assert http["DefaultActions"][0]["Type"] == "redirect"
    assert http["DefaultActions"][0]["RedirectConfig"]["Protocol"] == "HTTPS"
    rules = [r for r in clients.elbv2.describe_rules(ListenerArn=https["ListenerArn"])["Rules"] if not r["IsDefault"]]
    assert [aws._rule_paths(r) for r in rules] == [["/api/*", "/auth/*", "/api-docs/*"]]
    alb_group = clients.ec2.describe_security_groups(
        Filters=[{"Name": "group-name", "Values": ["gone-alb"]}])["SecurityGroups"][0]
    assert aws._permission_keys(alb_group["IpPermissions"]) == {
        ("tcp", 80, 80, "0.0.0.0/0"), ("tcp", 443, 443, "0.0.0.0/0")}


# -- destroy ---------------------------------------------------------------------------------------


def test_destroy_leaves_nothing_and_spares_other_stacks(
    deployed: Deployment, stuck: Stuck, console: Console
) -> None:
    settings = stuck.settings
    stack = desired_stack(settings)
    clients = deployed.aws
    assert aws.status(stack, clients).exists

    report = infra_cli.destroy(settings, endpoint_url=deployed.endpoint, console=console)
    assert report.changed and all(c.action == "delete" for c in report.changed)

    assert aws.find_vpc(clients, stack) is None
    assert clients.ec2.describe_subnets(Filters=[{"Name": "tag:Name", "Values": ["gone-*"]}])["Subnets"] == []
    assert clients.ec2.describe_security_groups(
        Filters=[{"Name": "group-name", "Values": ["gone-*"]}])["SecurityGroups"] == []
    assert clients.ec2.describe_internet_gateways(
        Filters=[{"Name": f"tag:{STACK_TAG}", "Values": ["gone"]}])["InternetGateways"] == []
    assert clients.logs.describe_log_groups(logGroupNamePrefix="/gone/")["logGroups"] == []
    names = {s["Name"] for s in clients.secretsmanager.list_secrets(IncludePlannedDeletion=True)["SecretList"]}
    assert not any(n.startswith("gone/") for n in names)
    with pytest.raises(clients.iam.exceptions.NoSuchEntityException):
        clients.iam.get_role(RoleName="gone-task-execution")
    assert not any(d["DBInstanceIdentifier"] == "gone-postgres"
                   for d in clients.rds.describe_db_instances()["DBInstances"])
    assert not any(g["DBSubnetGroupName"] == "gone-db"
                   for g in clients.rds.describe_db_subnet_groups()["DBSubnetGroups"])
    assert not aws.cluster_active(clients, stack)
    assert clients.ecs.list_task_definitions(familyPrefix="gone-", status="ACTIVE")["taskDefinitionArns"] == []
    assert aws.find_namespace(clients, stack) is None
    assert aws.find_load_balancer(clients, stack) is None
    assert all(aws.find_target_group(clients, tg.name) is None for tg in stack.target_groups)
    # (moto keeps the tags of deleted EC2 resources, so list the resources themselves.)
    vpcs = {v["VpcId"] for v in clients.ec2.describe_vpcs()["Vpcs"] if not v["IsDefault"]}
    assert vpcs == {aws.find_vpc(clients, deployed.stack)}
    assert clients.ec2.describe_route_tables(
        Filters=[{"Name": "tag:Name", "Values": ["gone-public"]}])["RouteTables"] == []

    again = infra_cli.destroy(settings, endpoint_url=deployed.endpoint, console=console)
    assert again.changed == []
    assert "Nothing to delete" in output(console)
    # The module's stack lives on, untouched.
    assert aws.status(deployed.stack, clients).healthy
    assert infra_cli.deploy(deployed.settings, endpoint_url=deployed.endpoint, console=console).changed == []
